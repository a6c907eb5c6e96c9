"""GPU experiment: the accuracy table. Does a Mamba network help, and does its Mamba part?

Four tasks (generated: lateral pairs and long-range position, thin long structures, anisotropic spacing with two
channels; derived from a real brain MRI: the MNI152 template, deformed, with left/right grey and white matter),
seven trainers (nnU-Net's network with left/right-aware mirroring, SegMamba-V2, SegMamba, MambaClinix and their
No-Mamba ablations), the same folds and fixed budget for all, run by `nnunet-segmamba sweep` (which resumes: run
this again after an interruption), then step time and peak memory of each network at each task's plans
(`nnunet-segmamba benchmark`). The baseline's first fold trains alone first: the table's last line says what
training `--jobs` at once bought. Prints the table last.

    python3 -u benchmarks/accuracy.py [--workspace /tmp/accuracy] [--epochs 10] [--iterations 40] [--jobs 8]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from nnunet_segmamba.datasets.raw import write_raw_dataset
from nnunet_segmamba.datasets.tasks import task_from_preset
from nnunet_segmamba.tools.environment import ext_trainer_folders

TASKS = {  # dataset id: (name, preset, overrides, what it stresses)
    981: ("Lateral", "iso", {"shape": (40, 48, 48)}, "left/right pair told apart by position, tube, speck"),
    982: ("Thin", "thin", {}, "a thin (radius 1 voxel) long tube"),
    983: ("Aniso2ch", "aniso", {"channels": 2}, "3 x 0.8 x 0.8 mm spacing, two channels"),
    984: ("Brain", "mni", {}, "MNI152 T1, deformed; grey/white matter, left/right"),
}
BASELINE = "nnUNetTrainerLateral"
TRAINERS = [BASELINE, "nnUNetTrainerSegMambaV2", "nnUNetTrainerSegMambaV2NoMamba", "nnUNetTrainerSegMamba",
            "nnUNetTrainerSegMambaNoMamba", "nnUNetTrainerMambaClinix", "nnUNetTrainerMambaClinixNoMamba"]


def run(command: list[str], env: dict[str, str], check: bool = True) -> int:
    print(f"\n>> {' '.join(command)}", flush=True)
    return subprocess.run(command, env=env, check=check).returncode


def dataset_name(dataset_id: int) -> str:
    return f"Dataset{dataset_id:03d}_{TASKS[dataset_id][0]}"


def prepare(workspace: Path, tasks: list[int], cases: int, env: dict[str, str]) -> None:
    """Generate the tasks' datasets and preprocess them, skipping what an earlier run did."""
    new = []
    for dataset_id in tasks:
        name, preset, overrides, _ = TASKS[dataset_id]
        if not (workspace / "nnUNet_raw" / dataset_name(dataset_id)).is_dir():
            write_raw_dataset(workspace / "nnUNet_raw", dataset_id, name, task_from_preset(preset, **overrides), cases,
                              0, seed=dataset_id, processes=min(8, os.cpu_count() or 1))
        if not (workspace / "nnUNet_preprocessed" / dataset_name(dataset_id) / "nnUNetPlans_3d_fullres").is_dir():
            new.append(str(dataset_id))
    if new:
        run(["nnUNetv2_plan_and_preprocess", "-d", *new, "-c", "3d_fullres", "-np", str(min(16, os.cpu_count() or 1))],
            env)


def sweep(workspace: Path, tasks: list[int], trainers: list[str], folds: list[str], jobs: int,
          args: argparse.Namespace, env: dict[str, str]) -> int:
    """`nnunet-segmamba sweep` at the fixed budget; its exit code."""
    return run(["nnunet-segmamba", "sweep", "-d", *map(str, tasks), "-tr", *trainers, "-f", *folds, "--epochs",
                str(args.epochs), "--iterations", str(args.iterations), "--jobs", str(jobs), "--device", args.device,
                "--baseline", BASELINE, "-o", str(workspace / "sweep")], env, check=False)


def benchmark(workspace: Path, tasks: list[int], trainers: list[str], env: dict[str, str]) -> dict[int, dict]:
    """Step time and peak memory of each trainer's network at each task's plans (fp16, the plans' batch)."""
    timings = {}
    for dataset_id in tasks:
        path = workspace / f"benchmark-{dataset_id}.json"
        if not path.is_file():
            run(["nnunet-segmamba", "benchmark", "-d", str(dataset_id), "-tr", *trainers, "--amp", "fp16",
                 "--warmup", "2", "--repeats", "5", "-o", str(path)], env, check=False)
        rows = json.loads(path.read_text())["results"] if path.is_file() else []
        timings[dataset_id] = {row["trainer"]: row for row in rows}
    return timings


def epoch_seconds(fold: Path) -> float:
    """The median epoch time nnU-Net logged for a fold (its last training log); NaN without one."""
    logs = sorted(fold.glob("training_log_*.txt"))
    times = [float(line.split("Epoch time: ")[1].split(" s")[0]) for line in logs[-1].read_text().splitlines()
             if "Epoch time: " in line] if logs else []
    return float(np.median(times)) if times else float("nan")


def concurrency_note(workspace: Path, dataset_id: int, suffix: str, folds: list[str], jobs: int) -> str:
    """What training `jobs` at once bought: the baseline's first fold trained alone, its other folds among the rest."""
    model = workspace / "nnUNet_results" / dataset_name(dataset_id) / f"{BASELINE}{suffix}__nnUNetPlans__3d_fullres"
    alone = epoch_seconds(model / f"fold_{folds[0]}")
    shared = np.nanmedian([epoch_seconds(model / f"fold_{f}") for f in folds[1:]] or [np.nan])
    return (f"Concurrency: {BASELINE} on {dataset_name(dataset_id)} took {alone:.1f} s per epoch alone and "
            f"{shared:.1f} s with up to {jobs} trainings at once: {jobs} at once train {jobs * alone / shared:.1f}x as "
            f"many epochs per hour as one at a time.")


def class_names(raw: Path, dataset: str) -> dict[str, str]:
    labels = json.loads((raw / dataset / "dataset.json").read_text())["labels"]
    return {str(value): name for name, value in labels.items()}


def table(comparison: dict, timings: dict[int, dict], trainers: list[str], suffix: str, raw: Path) -> str:
    """Markdown: per task and trainer, Dice per class (mean +- sd over folds), foreground Dice, the paired test
    against the baseline, parameters, step time and peak memory."""
    overview = {(r["dataset"], r["method"]): r for r in comparison["overview"] if r["split"] == "cv"}
    per_class: dict[tuple[str, str], list[str]] = {}
    for row in comparison["per_class"]:
        if row["split"] == "cv":
            name = class_names(raw, row["dataset"]).get(str(row["label"]), row["label"])
            per_class.setdefault((row["dataset"], row["method"]), []).append(
                f"{name} {row['dice']:.3f} ± {row['std_folds']:.3f}")
    lines = ["| task | trainer | Dice per class (mean ± sd over folds) | fg Dice | Δ vs baseline | p (Holm) | "
             "params M | step ms | peak GiB |", "|---|---|---|---|---|---|---|---|---|"]
    for dataset_id, timing in timings.items():
        dataset = dataset_name(dataset_id)
        for trainer in trainers:
            row, bench = overview.get((dataset, f"{trainer}{suffix}")), timing.get(trainer, {})
            if row is None or row["dice"] is None:
                lines.append(f"| {TASKS[dataset_id][0]} | {trainer} | missing | | | | | | |")
                continue
            versus = ("baseline", "") if trainer == BASELINE else (f"{row['mean_diff']:+.3f}", f"{row['p_holm']:.2g}")
            classes = "; ".join(per_class.get((dataset, row["method"]), []))
            lines.append(f"| {TASKS[dataset_id][0]} | {trainer} | {classes} | "
                         f"{row['dice']:.3f} ± {row['std_folds']:.3f} | {versus[0]} | {versus[1]} | "
                         f"{bench.get('params_m', float('nan')):.1f} | "
                         f"{bench.get('train_step_ms', float('nan')):.0f} | "
                         f"{bench.get('train_peak_gib') or float('nan'):.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workspace", default="/tmp/accuracy")
    parser.add_argument("--cases", type=int, default=20, help="training cases per task (cross-validation only)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--iterations", type=int, default=40)
    parser.add_argument("--folds", nargs="+", default=["0", "1", "2"])
    parser.add_argument("--jobs", type=int, default=8, help="trainings at once on the one GPU")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tasks", type=int, nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("-tr", "--trainers", nargs="+", default=TRAINERS, help="default: all seven")
    parser.add_argument("--no-alone", action="store_true", help="skip the lone baseline fold (no concurrency line)")
    parser.add_argument("--no-timings", action="store_true", help="skip the step time and peak memory runs")
    args = parser.parse_args()
    trainers = [BASELINE, *(t for t in args.trainers if t != BASELINE)]

    workspace = Path(args.workspace).resolve()
    folders = {name: workspace / name for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **{k: str(v) for k, v in folders.items()}, "nnUNet_compile": "f", "PYTHONUNBUFFERED": "1",
           "nnUNet_extTrainer": ext_trainer_folders()}
    prepare(workspace, args.tasks, args.cases, env)
    if not args.no_alone:
        sweep(workspace, args.tasks[:1], [BASELINE], args.folds[:1], 1, args, env)  # alone: what concurrency buys
    returncode = sweep(workspace, args.tasks, trainers, args.folds, args.jobs, args, env)
    timings = {d: {} for d in args.tasks} if args.no_timings else benchmark(workspace, args.tasks, trainers, env)
    comparison = json.loads((workspace / "sweep" / "compare" / "compare.json").read_text())
    suffix = f"_e{args.epochs}i{args.iterations}"
    print(f"\nAccuracy at a fixed budget ({args.epochs} epochs x {args.iterations} iterations, folds "
          f"{' '.join(args.folds)} of nnU-Net's 5-fold split, {args.cases} training cases per task, eager, fp16, "
          f"up to {args.jobs} trainings at once on one GPU); step time and peak memory: one training step of the "
          f"network at the task's plans, alone\n")
    print(table(comparison, timings, trainers, suffix, folders["nnUNet_raw"]))
    if not args.no_alone:
        print("\n" + concurrency_note(workspace, args.tasks[0], suffix, args.folds, args.jobs))
    sys.exit(returncode)


if __name__ == "__main__":
    main()
