"""GPU experiment: nnU-Net's default mirroring against left/right-aware mirroring on a generated lateral dataset.

Trains side by side on one GPU, for the same budget: nnU-Net's nnUNetTrainer (its default mirroring),
nnUNetTrainerLateral and nnUNetTrainerSegMambaV2, each in mode swap and exclude; then nnUNetv2_predict on the
held-out cases (test-time mirroring on), nnUNetv2_evaluate_folder, and a table of test Dice per class.

    python3 -u benchmarks/lateral_evidence.py [--epochs 12] [--iterations 50] [--folds 0 1 2] [--workspace /tmp/lateral]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_segmamba.datasets.raw import write_raw_dataset
from nnunet_segmamba.datasets.synthetic import LABELS
from nnunet_segmamba.datasets.tasks import task_from_preset
from nnunet_segmamba.tools.demo import Workspace, run_steps
from nnunet_segmamba.training.lateral import nnUNetTrainerLateral
from nnunet_segmamba.training.segmamba import nnUNetTrainerSegMambaV2
from nnunet_segmamba.training.variants import write_variants_module

DATASET_ID = 970
RUNS = {  # name: (trainer, lateral mode; None: nnU-Net's own mirroring)
    "nnUNetTrainer_ev": (nnUNetTrainer, None),
    "nnUNetTrainerLateral_ev": (nnUNetTrainerLateral, "swap"),
    "nnUNetTrainerLateralExclude_ev": (nnUNetTrainerLateral, "exclude"),
    "nnUNetTrainerSegMambaV2_ev": (nnUNetTrainerSegMambaV2, "swap"),
    "nnUNetTrainerSegMambaV2Exclude_ev": (nnUNetTrainerSegMambaV2, "exclude"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workspace", default="/tmp/lateral")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--iterations", type=int, default=50)
    parser.add_argument("--cases", type=int, default=24)
    parser.add_argument("--test-cases", type=int, default=8)
    parser.add_argument("--shape", type=int, nargs=3, default=(48, 48, 48))
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--folds", type=int, nargs="+", default=[0], help="trained side by side (default 0)")
    args = parser.parse_args()

    workspace = Workspace(Path(args.workspace))
    workspace.prepare()
    env = workspace.environment()
    cpus = os.cpu_count() or 2
    spec = task_from_preset("iso", shape=tuple(args.shape))
    raw = write_raw_dataset(workspace.raw, DATASET_ID, "Lateral", spec, args.cases, args.test_cases, seed=7,
                            processes=min(8, cpus))
    budget = {"num_epochs": args.epochs, "num_iterations_per_epoch": args.iterations,
              "num_val_iterations_per_epoch": max(1, args.iterations // 5)}
    write_variants_module(workspace.trainers, "evidence_trainers", {
        name: (base, {**budget, **({"lateral_mode": mode} if mode else {})}) for name, (base, mode) in RUNS.items()})
    run_steps({"preprocess": ["nnUNetv2_plan_and_preprocess", "-d", str(DATASET_ID), "-c", "3d_fullres", "-np",
                              str(min(8, cpus))]}, workspace, env)
    # nnU-Net's augmentation is CPU-bound: the host's cores split across the trainings that share the GPU
    runs = [(name, fold) for fold in args.folds for name in RUNS]
    train_env = {**env, "nnUNet_n_proc_DA": str(max(1, cpus // len(runs)))}
    started = time.time()
    seconds = run_steps({f"{name}_f{fold}": ["nnUNetv2_train", str(DATASET_ID), "3d_fullres", str(fold), "-tr", name,
                                             "-device", args.device] for name, fold in runs}, workspace, train_env)
    print(f"trainings side by side: {time.time() - started:.0f} s", flush=True)
    predictions = {(name, fold): workspace.predictions / f"{name}_f{fold}" for name, fold in runs}
    run_steps({f"predict_{name}_f{fold}": ["nnUNetv2_predict", "-i", str(raw / "imagesTs"), "-o",
                                           str(predictions[name, fold]), "-d", str(DATASET_ID), "-c", "3d_fullres",
                                           "-tr", name, "-f", str(fold), "-npp", "2", "-nps", "2", "-device",
                                           args.device] for name, fold in runs}, workspace, env)
    run_steps({f"evaluate_{name}_f{fold}": ["nnUNetv2_evaluate_folder", str(raw / "labelsTs"),
                                            str(predictions[name, fold]), "-djfile", str(raw / "dataset.json"),
                                            "-pfile", str(workspace.results / raw.name /
                                                          f"{name}__nnUNetPlans__3d_fullres" / "plans.json"),
                                            "-np", "2"] for name, fold in runs}, workspace, env)

    classes = [name for name, value in LABELS.items() if value]
    print(f"\nTest Dice (mean +- sd over folds {' '.join(map(str, args.folds))}), {args.cases} training / "
          f"{args.test_cases} test cases of {'x'.join(map(str, args.shape))}, {args.epochs} epochs x "
          f"{args.iterations} iterations, all {len(runs)} trainings at once on one GPU, eager")
    print("| trainer | mirroring | " + " | ".join(classes) + " | lateral mean | fg mean | lateral mean per fold | "
          "train s |")
    print("|---|---|" + "---|" * (len(classes) + 4))
    for name, (base, mode) in RUNS.items():
        dice = {c: [] for c in [*classes, "lateral", "fg"]}
        for fold in args.folds:
            summary = json.loads((predictions[name, fold] / "summary.json").read_text())
            for c in classes:
                dice[c].append(summary["mean"][str(LABELS[c])]["Dice"])
            dice["lateral"].append((dice["blob_left"][-1] + dice["blob_right"][-1]) / 2)
            dice["fg"].append(summary["foreground_mean"]["Dice"])
        cells = [f"{np.mean(v):.3f} +- {np.std(v):.3f}" for v in dice.values()]
        train = np.mean([seconds[f"{name}_f{fold}"] for fold in args.folds])
        print(f"| {base.__name__} | {mode or 'nnU-Net default'} | " + " | ".join(cells) + " | " +
              " ".join(f"{v:.3f}" for v in dice["lateral"]) + f" | {train:.0f} |")


if __name__ == "__main__":
    main()
