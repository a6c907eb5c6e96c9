"""CPU inference cost: what `nnUNetv2_predict -device cpu` costs with nnU-Net's network and with ours.

The brain task (`synth` preset `mni`: the MNI152 template deformed, at nnU-Net's plans for it), each trainer trained
for a token budget (1 epoch x 2 iterations: the checkpoint is what counts here, not its accuracy), then the stock
`nnUNetv2_predict -device cpu` of the test cases with nnU-Net's defaults (mirroring, step 0.5), timed per trainer,
the trainers taking turns in every repeat so that load from other work falls on all of them alike. Reports the wall
time and the CPU time (user + system of the command and its worker processes) per run, and the network's share: the
sliding-window seconds per case that nnUNetv2_predict's progress bar reports, summed; each with its ratio to the first
trainer's. That is nnUNetTrainerLateral: nnU-Net's network with the same mirroring as ours (the brain task has
left/right labels: our trainers and it mirror 2 axes at test time, 4 passes per patch; stock nnUNetTrainer mirrors 3
axes, 8 passes). Re-running skips what a run before did (the dataset, the trainings).

    python3 -u benchmarks/cpu_inference.py [--workspace /tmp/cpu_inference] [--test-cases 2] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from nnunet_segmamba.datasets.raw import write_raw_dataset
from nnunet_segmamba.datasets.tasks import task_from_preset
from nnunet_segmamba.tools.environment import ext_trainer_folders, find_trainer
from nnunet_segmamba.tools.results import parameter_count
from nnunet_segmamba.training.variants import write_variants_module

DATASET_ID, NAME = 985, "BrainCPU"
TRAINERS = ["nnUNetTrainerLateral", "nnUNetTrainer", "nnUNetTrainerSegMambaV2", "nnUNetTrainerSegMamba",
            "nnUNetTrainerMambaClinix"]
TOKEN_BUDGET = {"num_epochs": 1, "num_iterations_per_epoch": 2, "num_val_iterations_per_epoch": 1}
SUFFIX = "_1x2"


def run(command: list[str], env: dict[str, str], log: Path) -> tuple[float, float]:
    """Runs `command` with its output to `log`; (wall seconds, CPU seconds of it and its children). Raises on failure."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    begin = time.perf_counter()
    with open(log, "w") as out:
        code = subprocess.run(command, env=env, stdout=out, stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - begin
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if code:
        sys.exit(f"{' '.join(command)} failed (exit code {code}); log: {log}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def prepare(workspace: Path, cases: int, test_cases: int, env: dict[str, str]) -> Path:
    """The brain dataset, preprocessed (skipped when there); its raw folder."""
    raw = workspace / "nnUNet_raw" / f"Dataset{DATASET_ID}_{NAME}"
    if not raw.is_dir():
        write_raw_dataset(workspace / "nnUNet_raw", DATASET_ID, NAME, task_from_preset("mni"), cases, test_cases,
                          seed=DATASET_ID, processes=min(4, os.cpu_count() or 1))
    if not (workspace / "nnUNet_preprocessed" / raw.name / "nnUNetPlans_3d_fullres").is_dir():
        print(">> nnUNetv2_plan_and_preprocess", flush=True)
        run(["nnUNetv2_plan_and_preprocess", "-d", str(DATASET_ID), "-c", "3d_fullres", "-np", "2"], env,
            workspace / "plan_and_preprocess.log")
    return raw


def train(workspace: Path, trainers: list[str], env: dict[str, str]) -> None:
    """Each trainer's token-budget variant, fold 0 (skipped when its final checkpoint is there)."""
    for name in trainers:
        model = workspace / "nnUNet_results" / f"Dataset{DATASET_ID}_{NAME}" / f"{name}__nnUNetPlans__3d_fullres"
        if (model / "fold_0" / "checkpoint_final.pth").is_file():
            continue
        print(f">> nnUNetv2_train {name} (token budget)", flush=True)
        seconds, _ = run(["nnUNetv2_train", str(DATASET_ID), "3d_fullres", "0", "-tr", name, "-device", "cpu"], env,
                         workspace / f"train_{name}.log")
        print(f"   {seconds:.0f} s", flush=True)


def predict(workspace: Path, raw: Path, trainers: list[str], repeats: int, env: dict[str, str]) -> dict:
    """{trainer: {"wall": [...], "cpu": [...], "network": [...]}}: nnUNetv2_predict -device cpu of the test cases,
    the trainers taking turns in every repeat."""
    times = {name: {"wall": [], "cpu": [], "network": []} for name in trainers}
    for repeat in range(repeats):
        for name in trainers:
            output = workspace / "predictions" / name
            shutil.rmtree(output, ignore_errors=True)
            wall, cpu = run(["nnUNetv2_predict", "-i", str(raw / "imagesTs"), "-o", str(output), "-d", str(DATASET_ID),
                             "-c", "3d_fullres", "-tr", name, "-f", "0", "-device", "cpu"], env,
                            workspace / f"predict_{name}.log")
            times[name]["wall"].append(wall)
            times[name]["cpu"].append(cpu)
            times[name]["network"].append(sliding_window_seconds(workspace / f"predict_{name}.log"))
            print(f"   repeat {repeat + 1}: {name} {wall:.1f} s ({cpu:.1f} CPU s, network "
                  f"{times[name]['network'][-1]:.1f} s)", flush=True)
    return times


def sliding_window_seconds(log: Path) -> float:
    """The cases' sliding-window seconds in nnUNetv2_predict's output: per progress bar (a line each) its final
    state `n/n [elapsed<left, rate]`, n patches at that rate."""
    total = 0.0
    for line in log.read_bytes().decode(errors="replace").split("\n"):  # a bar redraws itself after \r
        done = [m for m in re.findall(r"(\d+)/(\d+) \[[^,\]]*, *([\d.]+)(s/it|it/s)\]", line) if m[0] == m[1]]
        if done:
            n, _, rate, unit = done[-1]
            total += int(n) * (float(rate) if unit == "s/it" else 1 / float(rate))
    return total


def threads() -> int:
    """The torch threads nnUNetv2_predict runs its network with on the CPU: min(nnUNet_def_n_proc, CPUs)."""
    return min(int(os.environ.get("nnUNet_def_n_proc", 8)), os.cpu_count() or 1)


def table(times: dict, params: dict, cases: int) -> str:
    """Markdown: per trainer the median wall, CPU and network seconds per run, each with its ratio to the first
    trainer's."""
    medians = {name: {k: statistics.median(v) for k, v in t.items()} for name, t in times.items()}
    reference = next(iter(medians.values()))
    lines = [f"| network (trainer) | params M | nnUNetv2_predict, {cases} cases: wall s | x | CPU s | x | "
             f"sliding windows s | x |", "|---|---|---|---|---|---|---|---|"]
    for name, m in medians.items():
        cells = " | ".join(f"{m[k]:.1f} | {m[k] / reference[k]:.2f}" for k in ("wall", "cpu", "network"))
        lines.append(f"| {name.removesuffix(SUFFIX)} | {params[name]:.1f} | {cells} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workspace", default="/tmp/cpu_inference")
    parser.add_argument("--cases", type=int, default=5, help="training cases (nnU-Net's split needs 5)")
    parser.add_argument("--test-cases", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2, help="0: prepare and train only")
    parser.add_argument("-tr", "--trainers", nargs="+", default=TRAINERS)
    args = parser.parse_args()
    workspace = Path(args.workspace).resolve()
    (workspace / "predictions").mkdir(parents=True, exist_ok=True)
    variants = workspace / "trainers"
    env = {**os.environ, "nnUNet_raw": str(workspace / "nnUNet_raw"),
           "nnUNet_preprocessed": str(workspace / "nnUNet_preprocessed"),
           "nnUNet_results": str(workspace / "nnUNet_results"), "nnUNet_extTrainer": ext_trainer_folders(str(variants)),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    os.environ.update(env)  # this process's trainer lookups
    names = [f"{trainer}{SUFFIX}" for trainer in args.trainers]
    write_variants_module(variants, "cpu_inference_trainers",
                          {name: (find_trainer(trainer), TOKEN_BUDGET) for name, trainer in zip(names, args.trainers)})
    raw = prepare(workspace, args.cases, args.test_cases, env)
    train(workspace, names, env)
    if not args.repeats:  # the checkpoints only; a later run times the predictions
        return 0
    times = predict(workspace, raw, names, args.repeats, env)
    results = workspace / "nnUNet_results" / raw.name
    params = {name: parameter_count(str(results / f"{name}__nnUNetPlans__3d_fullres"), name, "3d_fullres")
              for name in names}
    (workspace / "cpu_inference.json").write_text(json.dumps({"times": times, "params_m": params}, indent=2))
    plans = json.loads((workspace / "nnUNet_preprocessed" / raw.name / "nnUNetPlans.json").read_text())
    configuration = plans["configurations"]["3d_fullres"]
    print(f"\nnnUNetv2_predict -device cpu, {args.test_cases} cases of the brain task (patch "
          f"{configuration['patch_size']}, median image {configuration['median_image_size_in_voxels']}), medians of "
          f"{args.repeats} runs, torch threads: {threads()}\n")
    print(table(times, params, args.test_cases))
    return 0


if __name__ == "__main__":
    sys.exit(main())
