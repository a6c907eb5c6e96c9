"""`nnunet-segmamba demo`: the whole product on generated data, through nnU-Net's stock commands.

In its own workspace (nnUNet_raw/preprocessed/results of its own, never the user's): generate a dataset,
nnUNetv2_plan_and_preprocess, then for nnU-Net's trainer (with our left/right-aware mirroring, as ours: the
generated blob_left/blob_right are a lateral pair) and ours (SegMamba-V2 on the CPU, all three with CUDA), with a
budget that learns the task: nnUNetv2_train (fold 0), nnUNetv2_predict on the held-out cases,
nnUNetv2_evaluate_folder; finally a table (test Dice per class and mean, validation Dice, training time,
parameters) and a picture (`demo_report`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from nnunet_segmamba.tools.errors import FAILURE, report
from nnunet_segmamba.tools.processes import end_tree

MARKER = ".nnunet_segmamba_demo"
PATH_VARIABLES = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "nnUNet_extTrainer")
"""The user's values of these never reach the demo's commands (its settings such as nnUNet_def_n_proc do)."""
DATASET_ID = 990
TRAINERS = ["nnUNetTrainerLateral", "nnUNetTrainerSegMambaV2", "nnUNetTrainerSegMamba", "nnUNetTrainerMambaClinix"]


@dataclass(frozen=True)
class Budget:
    """What a demo run generates and trains by default."""

    preset: str
    cases: int
    test_cases: int
    epochs: int
    iterations: int
    trainers: tuple[str, ...]


BUDGETS = {  # times and test Dice in BENCHMARKS.md, "The demo" (gpu: 411 s in all on an H200)
    "cpu": Budget("demo", cases=12, test_cases=4, epochs=10, iterations=60, trainers=TRAINERS[:2]),
    "gpu": Budget("demo", cases=20, test_cases=5, epochs=12, iterations=50, trainers=TRAINERS),
}
PROGRESS = ("Epoch ", "train_loss", "Pseudo dice", "Mean Validation Dice", "Epoch time", "Preprocessing",
            "predicting", "Training done")


class StepFailed(RuntimeError):
    pass


class Workspace:
    """The demo's folders; the environment its subprocesses run in."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.raw, self.preprocessed, self.results = (root / n for n in ("nnUNet_raw", "nnUNet_preprocessed",
                                                                        "nnUNet_results"))
        self.trainers, self.logs, self.predictions = root / "trainers", root / "logs", root / "predictions"

    def problem(self) -> str | None:
        """Why the demo may not use this folder (it exists and is not a demo workspace); None if it may."""
        if self.root.exists() and not (self.root / MARKER).exists():
            return f"{self.root} exists and is not a demo workspace; choose another --workspace"
        return None

    def prepare(self) -> None:
        """Create the workspace, replacing an earlier demo's (`problem` says whether it may)."""
        if self.root.exists():
            shutil.rmtree(self.root)
        for folder in (self.raw, self.preprocessed, self.results, self.trainers, self.logs, self.predictions):
            folder.mkdir(parents=True)
        (self.root / MARKER).write_text("created by nnunet-segmamba demo; safe to delete\n")

    def environment(self) -> dict[str, str]:
        from nnunet_segmamba.tools.environment import trainers_folder

        env = {k: v for k, v in os.environ.items() if k not in PATH_VARIABLES}
        env.update(nnUNet_raw=str(self.raw), nnUNet_preprocessed=str(self.preprocessed),
                   nnUNet_results=str(self.results), PYTHONUNBUFFERED="1",
                   nnUNet_extTrainer=os.pathsep.join([trainers_folder(), str(self.trainers)]))
        # nnU-Net spawns 8 export processes by default; on small machines starting them costs more than the work
        env.setdefault("nnUNet_def_n_proc", str(max(1, min(4, (os.cpu_count() or 2) // 2))))
        # nnUNetTrainer compiles on CUDA by default; in a run this short the compilation would dominate its time
        env.setdefault("nnUNet_compile", "f")
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        return env


def run_steps(steps: dict[str, list[str]], workspace: Workspace, env: dict[str, str]) -> dict[str, float]:
    """Run stock commands side by side, each one's output to logs/<name>.log and its progress lines to the
    terminal; seconds each took. Any failure or interruption stops them all."""
    print("".join(f"\n>> {name}: {' '.join(command)}" for name, command in steps.items()), flush=True)
    prefix = "   " if len(steps) == 1 else "   {}: "
    begin, seconds, processes, readers = time.time(), {}, {}, []

    def follow(name: str, process: subprocess.Popen, log_path: Path) -> None:
        with open(log_path, "w") as log:
            for line in process.stdout:
                log.write(line)
                if any(key in line for key in PROGRESS):
                    print(f"{prefix.format(name)}{line.rstrip()[-110:]}", flush=True)
        process.wait()
        seconds[name] = time.time() - begin

    try:
        for name, command in steps.items():
            processes[name] = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                               env=env)
            readers.append(threading.Thread(target=follow, args=(name, processes[name], workspace.logs /
                                                                 f"{name}.log"), daemon=True))
            readers[-1].start()
        for reader in readers:
            while reader.is_alive():
                reader.join(0.2)
                failed = [n for n, p in processes.items() if p.poll() not in (None, 0)]
                if failed:
                    raise StepFailed(failed[0])
    except BaseException as error:
        for process in processes.values():
            end_tree(process)  # with nnU-Net's workers
        for reader in readers:
            reader.join()
        if not isinstance(error, StepFailed):
            raise
        name = str(error)
        log_path = workspace.logs / f"{name}.log"
        tail = "".join(log_path.read_text().splitlines(keepends=True)[-15:])
        raise StepFailed(f"step '{name}' failed (exit code {processes[name].returncode}); full log: {log_path}\n"
                         f"{tail}") from None
    for name in steps:
        print(f"{prefix.format(name)}done in {seconds[name]:.0f} s", flush=True)
    return seconds


@contextlib.contextmanager
def stage(stages: dict[str, float], name: str) -> Iterator[None]:
    """Records the seconds the block takes as stages[name]."""
    begin = time.time()
    yield
    stages[name] = time.time() - begin


def stage_report(stages: dict[str, float], total: float) -> str:
    """A line per stage with its seconds, then the total."""
    width = max(len(name) for name in (*stages, "total"))
    lines = [f"  {name:<{width}} {seconds:5.0f} s" for name, seconds in (*stages.items(), ("total", total))]
    return "\n".join(["Time per stage:", *lines])


def batch_size(model_folder: Path, configuration: str = "3d_fullres") -> int:
    plans = json.loads((model_folder / "plans.json").read_text())
    return plans["configurations"][configuration]["batch_size"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__.splitlines()[0].split(": ", 1)[1]
    parser.add_argument("--workspace", default="nnunet_segmamba_demo", help="folder of its own (replaced if it "
                        "holds an earlier demo; default ./nnunet_segmamba_demo)")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda if available")
    parser.add_argument("-tr", "--trainers", nargs="+", help=f"default on the CPU: "
                        f"{' '.join(BUDGETS['cpu'].trainers)}; with CUDA: {' '.join(BUDGETS['gpu'].trainers)}")
    parser.add_argument("--epochs", type=int, help="override the budget's epochs")
    parser.add_argument("--iterations", type=int, help="override the budget's iterations per epoch")


def main(args: argparse.Namespace) -> int:
    import torch

    from nnunet_segmamba.datasets.raw import write_raw_dataset
    from nnunet_segmamba.datasets.tasks import task_from_preset
    from nnunet_segmamba.tools import demo_report
    from nnunet_segmamba.tools.environment import find_trainer
    from nnunet_segmamba.tools.results import parameter_count
    from nnunet_segmamba.training.variants import write_variants_module

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    budget = BUDGETS["gpu" if device == "cuda" else "cpu"]
    epochs = budget.epochs if args.epochs is None else args.epochs
    iterations = budget.iterations if args.iterations is None else args.iterations
    workspace = Workspace(Path(args.workspace).resolve())
    started, stages = time.time(), {}
    env = workspace.environment()
    os.environ["nnUNet_extTrainer"] = env["nnUNet_extTrainer"]  # this process's own trainer lookups
    if min(epochs, iterations) < 1:
        return report("demo", "--epochs and --iterations must be at least 1")
    try:
        bases = {name: find_trainer(name) for name in args.trainers or budget.trainers}
    except RuntimeError as error:
        return report("demo", str(error))
    if workspace.problem():
        return report("demo", workspace.problem())
    try:
        workspace.prepare()
        print(f"nnunet-segmamba demo: workspace {workspace.root}, device {device}, trainers {', '.join(bases)}")
        spec = task_from_preset(budget.preset)
        print(f"\n>> generating {budget.cases} + {budget.test_cases} cases ({budget.preset}: {spec})")
        with stage(stages, "generate"):
            raw = write_raw_dataset(workspace.raw, DATASET_ID, "Demo", spec, budget.cases, budget.test_cases,
                                    seed=0, processes=max(1, min(8, (os.cpu_count() or 2) // 2)))
        dataset = raw.name
        short = {f"{name}_demo": (base, {"num_epochs": epochs, "num_iterations_per_epoch": iterations,
                                         "num_val_iterations_per_epoch": max(1, iterations // 10)})
                 for name, base in bases.items()}
        write_variants_module(workspace.trainers, "demo_trainers", short)
        # nnU-Net's fingerprinting starts 8 worker processes by default: for these small cases the start-ups cost
        # more than the work (2 cores: 19 s with them, 12 s with one)
        workers = env["nnUNet_def_n_proc"]
        stages.update(run_steps({"plan_and_preprocess": ["nnUNetv2_plan_and_preprocess", "-d", str(DATASET_ID),
                                                         "-c", "3d_fullres", "-npfp", workers, "-np", workers]},
                                workspace, env))
        train_env = {**env, "nnUNet_n_proc_DA": env.get("nnUNet_n_proc_DA", "0" if device == "cpu" else "8")}
        seconds = {}
        for name in short:
            step = f"train_{name}"
            seconds[name] = stages[step] = run_steps({step: ["nnUNetv2_train", str(DATASET_ID), "3d_fullres", "0",
                                                             "-tr", name, "-device", device]}, workspace, train_env)[step]
        models = {name: workspace.results / dataset / f"{name}__nnUNetPlans__3d_fullres" for name in short}
        predict = {name: ["nnUNetv2_predict", "-i", str(raw / "imagesTs"), "-o", str(workspace.predictions / name),
                          "-d", str(DATASET_ID), "-c", "3d_fullres", "-tr", name, "-f", "0", "-device", device,
                          "-npp", "0", "-nps", "0", *(["--disable_tta"] if device == "cpu" else [])]
                   for name in short}
        evaluate = {name: ["nnUNetv2_evaluate_folder", str(raw / "labelsTs"), str(workspace.predictions / name),
                           "-djfile", str(raw / "dataset.json"), "-pfile", str(models[name] / "plans.json"), "-np",
                           "1"] for name in short}
        # trainings one after the other (their times are compared); all trainers' predictions side by side, then
        # all evaluations: a stock command's cost here is mostly its start-up. -npp 0 -nps 0: nnU-Net predicts in
        # its own process, starting no workers (2 cores: 8 s for two trainers instead of 15 s)
        for name, commands in (("predict", predict), ("evaluate", evaluate)):
            with stage(stages, name):
                run_steps({f"{name}_{trainer}": command for trainer, command in commands.items()}, workspace, env)
        classes = {name: value for name, value in spec.labels.items() if value}
        rows = []
        for name, model in models.items():
            test = json.loads((workspace.predictions / name / "summary.json").read_text())
            validation = json.loads((model / "fold_0" / "validation" / "summary.json").read_text())
            rows.append({"trainer": name, "dice": {c: test["mean"][str(v)]["Dice"] for c, v in classes.items()},
                         "mean_dice": test["foreground_mean"]["Dice"],
                         "validation_dice": validation["foreground_mean"]["Dice"], "train_seconds": seconds[name],
                         "params_m": parameter_count(model, name, "3d_fullres")})
        title = (f"Demo on generated data ({budget.cases} training / {budget.test_cases} test cases of about "
                 f"{'x'.join(map(str, spec.shape))} voxels), fold 0, {epochs} epochs x {iterations} iterations "
                 f"(batch {batch_size(models[next(iter(models))])}), {device}"
                 f"{' (test prediction without mirroring)' if device == 'cpu' else ''}")
        case = sorted((raw / "labelsTs").iterdir())[0]
        shown = {"image": raw / "imagesTs" / case.name.replace(".nii.gz", "_0000.nii.gz"), "label": case}
        with stage(stages, "report"):
            text = demo_report.write(workspace.root, title, rows, list(classes), shown, models,
                                     {name: workspace.predictions / name / case.name for name in models})
        print(f"\n{text}\n\n{stage_report(stages, time.time() - started)}")
    except (StepFailed, OSError) as error:  # OSError: the workspace cannot be written (read-only, disk full)
        return report("demo", str(error), FAILURE)
    except KeyboardInterrupt:
        print(f"\ninterrupted: the demo stopped; {workspace.root} holds the steps done so far (no report). "
              "Run the demo again to start over.", file=sys.stderr)
        return 130
    print(f"\nReport: {workspace.root / 'report.md'} (picture: demo.png).\n"
          f"Compare the trainers' fold-0 results with:\n  nnUNet_results={workspace.results} nnunet-segmamba "
          f"compare -d {DATASET_ID} -tr {' '.join(short)} --baseline {next(iter(short))} -f 0 "
          f"-o {workspace.root / 'compare'}")
    return 0
