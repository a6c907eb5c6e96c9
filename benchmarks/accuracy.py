"""GPU experiment: the accuracy table. Does a Mamba network help, and does its Mamba part?

Four tasks (generated: lateral pairs and long-range position, thin long structures, anisotropic spacing with two
channels; derived from a real brain MRI: the MNI152 template, deformed, with left/right grey and white matter),
seven trainers (nnU-Net's network with left/right-aware mirroring, SegMamba-V2, SegMamba, MambaClinix and their
No-Mamba ablations), the same folds and fixed budget for all, trained by `nnunet-segmamba sweep --keep results`.

The study advances in increments that survive a lost machine. What has been measured lives in the repository
(`benchmarks/results/accuracy/`, laid out as nnUNet_results, fold results only: a few kB a fold). An increment, on
any GPU machine and day, generates and preprocesses the tasks, checks that their data and splits are those the
committed folds were trained on (`training_data.json` of each dataset: a fingerprint; other data are refused),
seeds nnUNet_results with the committed folds (the sweep skips them), trains whole folds of the rest within
--minutes, and packs the folds it finished into ARCHIVE in --pack after each one finishes. Back on the development
machine, `merge` adds them to the committed results; `table` prints the table of whatever has accumulated.

    python3 -u benchmarks/accuracy.py run --minutes 8 --pack $OUT [--jobs 14]   # an increment (GPU machine)
    python3 benchmarks/accuracy.py merge DIR/accuracy-results.tar.gz            # here: commit what came back
    python3 benchmarks/accuracy.py table                                        # the table so far
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from nnunet_segmamba.tools.environment import ext_trainer_folders
from nnunet_segmamba.tools.processes import end_tree, stop_signals_interrupt

TASKS = {  # dataset id: (name, preset, overrides, what it stresses)
    981: ("Lateral", "iso", {"shape": (40, 48, 48)}, "left/right pair told apart by position, tube, speck"),
    982: ("Thin", "thin", {}, "a thin (radius 1 voxel) long tube"),
    983: ("Aniso2ch", "aniso", {"channels": 2}, "3 x 0.8 x 0.8 mm spacing, two channels"),
    984: ("Brain", "mni", {}, "MNI152 T1, deformed; grey/white matter, left/right"),
}
BASELINE = "nnUNetTrainerLateral"
TRAINERS = [BASELINE, "nnUNetTrainerSegMambaV2", "nnUNetTrainerSegMambaV2NoMamba", "nnUNetTrainerSegMamba",
            "nnUNetTrainerSegMambaNoMamba", "nnUNetTrainerMambaClinix", "nnUNetTrainerMambaClinixNoMamba"]
PLANS, CONFIGURATION = "nnUNetPlans", "3d_fullres"
RESULTS = Path(__file__).resolve().parent / "results" / "accuracy"
"""The committed folds (--results): nnUNet_results' layout, results only."""
ARCHIVE = "accuracy-results.tar.gz"
POLL_SECONDS = 15
PACK_MARGIN_MINUTES = 1.0
"""Left of --minutes after the sweep's time limit: its comparison and the last pack."""


def dataset_name(dataset_id: int) -> str:
    return f"Dataset{dataset_id:03d}_{TASKS[dataset_id][0]}"


def budget_suffix(args: argparse.Namespace) -> str:
    return f"_e{args.epochs}i{args.iterations}"


def fold_folder(root: Path, dataset_id: int, trainer: str, fold: str) -> Path:
    return root / dataset_name(dataset_id) / f"{trainer}__{PLANS}__{CONFIGURATION}" / f"fold_{fold}"


def grid_folds(root: Path, args: argparse.Namespace) -> list[Path]:
    return [fold_folder(root, d, f"{t}{budget_suffix(args)}", f) for f in args.folds for d in args.tasks
            for t in args.trainers]


def run(command: list[str], env: dict[str, str]) -> None:
    """Run a command to its end; if we are stopped first, it ends too, with its workers."""
    print(f"\n>> {' '.join(command)}", flush=True)
    process = subprocess.Popen(command, env=env)
    try:
        if process.wait():
            raise subprocess.CalledProcessError(process.returncode, command)
    finally:
        if process.poll() is None:
            end_tree(process)


def prepare(folders: dict[str, Path], tasks: list[int], cases: int, env: dict[str, str]) -> None:
    """Generate the tasks and preprocess them (skipping what an earlier run did), write nnU-Net's default splits,
    and record each task's data fingerprint in nnUNet_results."""
    from nnunet_segmamba.datasets.raw import write_raw_dataset
    from nnunet_segmamba.datasets.tasks import task_from_preset
    from nnunet_segmamba.tools.fold_results import data_fingerprint, write_data_fingerprint
    from nnunet_segmamba.tools.sweep import write_missing_splits

    started, new = time.time(), []
    for dataset_id in tasks:
        name, preset, overrides, _ = TASKS[dataset_id]
        if not (folders["nnUNet_raw"] / dataset_name(dataset_id)).is_dir():
            write_raw_dataset(folders["nnUNet_raw"], dataset_id, name, task_from_preset(preset, **overrides), cases,
                              0, seed=dataset_id, processes=min(8, os.cpu_count() or 1))
        if not (folders["nnUNet_preprocessed"] / dataset_name(dataset_id) / f"{PLANS}_{CONFIGURATION}").is_dir():
            new.append(str(dataset_id))
    if new:
        run(["nnUNetv2_plan_and_preprocess", "-d", *new, "-c", CONFIGURATION, "-np", str(min(16, os.cpu_count() or 1))],
            env)
    names = [dataset_name(d) for d in tasks]
    write_missing_splits(names, PLANS, CONFIGURATION)
    for name in names:
        write_data_fingerprint(folders["nnUNet_results"], name, data_fingerprint(
            folders["nnUNet_raw"] / name, folders["nnUNet_preprocessed"] / name, PLANS))
    print(f"tasks generated and preprocessed in {time.time() - started:.0f} s", flush=True)


def seed(committed: Path, results: Path) -> int:
    """Merge the committed folds into nnUNet_results (refused for other data); how many there are."""
    from nnunet_segmamba.tools.fold_results import merge_results

    if not list(committed.glob("*/*/fold_*/validation/summary.json")):
        return 0
    return len(merge_results(committed, results))


def unlocked_results(folds: list[Path]) -> list[Path]:
    """The folds with results whose job is done (it holds the fold's lock through training, validation and
    pruning)."""
    from nnunet_segmamba.tools.fold_results import fold_has_results
    from nnunet_segmamba.tools.sweep_jobs import lock_holder

    return [fold for fold in folds if fold_has_results(fold) and lock_holder(fold) is None]


def train(folders: dict[str, Path], args: argparse.Namespace, minutes: float | None, env: dict[str, str]) -> int:
    """The sweep over what is left of the grid, its folds packed into --pack/ARCHIVE as they finish; its exit
    code."""
    from nnunet_segmamba.tools.fold_results import pack

    root, archive = folders["nnUNet_results"], Path(args.pack).resolve() / ARCHIVE
    folds = grid_folds(root, args)
    seeded = set(unlocked_results(folds))
    command = ["nnunet-segmamba", "sweep", "-d", *map(str, args.tasks), "-tr", *args.trainers, "-f", *args.folds,
               "--epochs", str(args.epochs), "--iterations", str(args.iterations), "--jobs", str(args.jobs),
               "--device", args.device, "--baseline", BASELINE, "--keep", "results",
               "-o", str(Path(args.workspace) / "sweep"), *(["--time-limit", f"{minutes:.2f}"] if minutes else [])]
    print(f"\n>> {' '.join(command)}", flush=True)
    process, packed, returncode = subprocess.Popen(command, env=env), set(), None
    try:
        while returncode is None:
            try:
                returncode = process.wait(POLL_SECONDS)
            except subprocess.TimeoutExpired:
                pass
            new = set(unlocked_results(folds)) - seeded
            if new != packed:
                count = pack(root, sorted(new), archive, plots=False)
                print(f"[accuracy] {count} new folds packed into {archive}", flush=True)
                packed = new
    finally:
        if process.poll() is None:  # stopped ourselves: the sweep cancels its trainings on SIGTERM
            end_tree(process)
    return returncode


def mean_sd(mean: float | None, sd: float | None) -> str:
    """'0.912 ± 0.010'; the mean alone where there is no spread (one fold)."""
    if mean is None or math.isnan(mean):
        return "–"
    return f"{mean:.3f}" if sd is None or math.isnan(sd) else f"{mean:.3f} ± {sd:.3f}"


def comparison(root: Path, args: argparse.Namespace):
    """compare's statistics (in this process: no plots) of the study's folds under `root`, or None without any."""
    from nnunet_segmamba.tools.comparison import build_comparison
    from nnunet_segmamba.tools.results import collect_cross_validation, make_methods, parameter_table

    os.environ["nnUNet_results"] = str(root)
    datasets, suffix = [dataset_name(d) for d in args.tasks], budget_suffix(args)
    methods = make_methods([f"{t}{suffix}" for t in args.trainers], [PLANS], [CONFIGURATION], f"{BASELINE}{suffix}")
    rows, gaps = collect_cross_validation([d for d in datasets if (root / d).is_dir()], methods, args.folds)
    if not rows:
        return None
    return build_comparison(rows, gaps, ["cv"], datasets, methods, f"{BASELINE}{suffix}",
                            parameter_table(datasets, methods))


def class_names(root: Path, dataset: str) -> dict[str, str]:
    """Label value -> name, from any of the dataset's model folders."""
    for path in sorted((root / dataset).glob("*/dataset.json")):
        return {str(value): name for name, value in json.loads(path.read_text())["labels"].items()}
    return {}


def table(result, root: Path, args: argparse.Namespace) -> str:
    """Markdown of `comparison`'s result: per task and trainer, the folds found, Dice per class (mean ± sd over
    folds), foreground Dice, the paired test against the baseline (Holm-corrected over the table), parameters."""
    import pandas as pd

    per_class: dict[tuple[str, str], list[str]] = {}
    for row in result.classes.to_dict("records"):
        if row["foreground"]:
            name = class_names(root, row["dataset"]).get(str(row["label"]), str(row["label"]))
            per_class.setdefault((row["dataset"], row["method"]), []).append(
                f"{name} {mean_sd(row['dice'], row['std_folds'])}")
    lines = ["| task | trainer | folds | Dice per class (mean ± sd over folds) | fg Dice | Δ vs baseline | "
             "p (Holm) | params M |", "|---|---|---|---|---|---|---|---|"]
    baseline = f"{BASELINE}{budget_suffix(args)}"
    for row in result.overview.to_dict("records"):
        task, trainer = row["dataset"].split("_", 1)[1], row["method"].removesuffix(budget_suffix(args))
        if not row["folds"]:
            lines.append(f"| {task} | {trainer} | 0 | | | | | |")
            continue
        paired = row["method"] != baseline and not pd.isna(row["pairs"]) and row["pairs"] > 0
        versus = (f"{row['mean_diff']:+.3f}", f"{row['p_holm']:.2g}") if paired else (
            "baseline" if row["method"] == baseline else "–", "")
        classes = "; ".join(per_class.get((row["dataset"], row["method"]), []))
        parameters = "–" if pd.isna(row["params_m"]) else f"{row['params_m']:.1f}"
        lines.append(f"| {task} | {trainer} | {row['folds']} | {classes} | {mean_sd(row['dice'], row['std_folds'])} | "
                     f"{versus[0]} | {versus[1]} | {parameters} |")
    return "\n".join(lines)


def ablation_table(result, args: argparse.Namespace) -> str:
    """Markdown: does the Mamba part help? Each network against its own No-Mamba ablation (both among the
    trainers), per task: foreground Dice of each, the mean paired difference of case foreground Dice, and the
    two-sided Wilcoxon test on those pairs, Holm-corrected over this table's tests."""
    from nnunet_segmamba.tools.comparison import paired_tests

    suffix = budget_suffix(args)
    ablation_of = {f"{t}{suffix}": f"{t}NoMamba{suffix}" for t in args.trainers if f"{t}NoMamba" in args.trainers}
    tests = paired_tests(result.case_fg, ablation_of)
    if tests.empty:
        return "no network with its ablation yet"
    dice = result.overview.set_index(["dataset", "method"])["dice"]
    lines = ["| task | network | pairs | fg Dice with Mamba | without | Δ (with - without) | p (Holm) |",
             "|---|---|---|---|---|---|---|"]
    for row in tests.to_dict("records"):
        p_holm = "" if math.isnan(row["p_holm"]) else f"{row['p_holm']:.2g}"
        lines.append(f"| {row['dataset'].split('_', 1)[1]} | {row['method'].removesuffix(suffix)} | {row['pairs']} | "
                     f"{dice[row['dataset'], row['method']]:.3f} | {dice[row['dataset'], row['baseline']]:.3f} | "
                     f"{row['mean_diff']:+.3f} | {p_holm} |")
    return "\n".join(lines)


def with_variants(args: argparse.Namespace) -> tempfile.TemporaryDirectory:
    """The budget variants of the trainers (for their parameter counts), on nnUNet_extTrainer of this process."""
    from nnunet_segmamba.tools.environment import find_trainer
    from nnunet_segmamba.tools.sweep import budget_of
    from nnunet_segmamba.training.variants import write_variants_module

    folder = tempfile.TemporaryDirectory()
    os.environ["nnUNet_extTrainer"] = ext_trainer_folders()
    suffix, budget = budget_of(args)
    write_variants_module(folder.name, "accuracy_variants",
                          {f"{t}{suffix}": (find_trainer(t), budget) for t in args.trainers})
    os.environ["nnUNet_extTrainer"] = ext_trainer_folders(folder.name)
    return folder


def print_table(root: Path, args: argparse.Namespace) -> None:
    with with_variants(args):
        print(f"\nAccuracy at a fixed budget ({args.epochs} epochs x {args.iterations} iterations, folds "
              f"{' '.join(args.folds)} of nnU-Net's 5-fold split, {args.cases} training cases per task, eager, fp16)"
              f"\n")
        result = comparison(root, args)
        if result is None:
            print("no folds yet")
            return
        print(f"{table(result, root, args)}\n\nDoes the Mamba part help? Each network against its No-Mamba "
              f"ablation, paired on the validation cases both have\n\n{ablation_table(result, args)}")


def run_increment(args: argparse.Namespace) -> int:
    from nnunet_segmamba.tools.fold_results import MergeError

    started = time.time()
    workspace = Path(args.workspace).resolve()
    folders = {name: workspace / name for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **{k: str(v) for k, v in folders.items()}, "nnUNet_compile": "f", "PYTHONUNBUFFERED": "1",
           "nnUNet_extTrainer": ext_trainer_folders()}
    os.environ.update({k: str(v) for k, v in folders.items()})
    prepare(folders, args.tasks, args.cases, env)
    try:
        print(f"seeded nnUNet_results with {seed(args.results, folders['nnUNet_results'])} committed folds", flush=True)
    except MergeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    minutes = args.minutes - (time.time() - started) / 60 - PACK_MARGIN_MINUTES if args.minutes else None
    if minutes is not None and minutes <= 0:
        print(f"error: --minutes {args.minutes} leaves no time to train after the preparation", file=sys.stderr)
        return 1
    returncode = train(folders, args, minutes, env)
    print_table(folders["nnUNet_results"], args)
    return returncode


def merge(args: argparse.Namespace) -> int:
    from nnunet_segmamba.tools.fold_results import MergeError, merge_results

    for archive in args.archives:
        try:
            added = merge_results(Path(archive), args.results)
        except MergeError as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
        print(f"{archive}: {len(added)} folds added to {args.results}" + "".join(f"\n  {fold}" for fold in added))
    print_table(args.results, args)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    increment = commands.add_parser("run", help="an increment: train what is left, within --minutes (GPU machine)")
    increment.add_argument("--workspace", default="/tmp/accuracy")
    increment.add_argument("--minutes", type=float, help="the increment's whole time, preparation included "
                           "(default: no limit)")
    increment.add_argument("--pack", default=".", help=f"folder for {ARCHIVE}, the folds this increment finished")
    increment.add_argument("--jobs", type=int, default=14, help="trainings at once on the one GPU")
    increment.add_argument("--device", default="cuda")
    merging = commands.add_parser("merge", help="add increments' folds to the committed ones (--results)")
    merging.add_argument("archives", nargs="+")
    showing = commands.add_parser("table", help="print the table of the folds committed so far")
    for command in (increment, merging, showing):
        command.add_argument("--results", type=Path, default=RESULTS,
                             help="the committed folds (default: %(default)s)")
        command.add_argument("--cases", type=int, default=20, help="training cases per task (cross-validation only)")
        command.add_argument("--epochs", type=int, default=10)
        command.add_argument("--iterations", type=int, default=40)
        command.add_argument("--folds", nargs="+", default=["0", "1", "2"])
        command.add_argument("--tasks", type=int, nargs="+", default=list(TASKS), choices=list(TASKS))
        command.add_argument("-tr", "--trainers", nargs="+", default=TRAINERS, help="default: all seven")
    args = parser.parse_args()
    args.trainers = [BASELINE, *(t for t in args.trainers if t != BASELINE)]
    with stop_signals_interrupt():  # SIGTERM and SIGHUP as Ctrl-C: the sweep and its trainings end with us
        if args.command == "run":
            return run_increment(args)
        if args.command == "merge":
            return merge(args)
        print_table(args.results, args)
        return 0


if __name__ == "__main__":
    sys.exit(main())
