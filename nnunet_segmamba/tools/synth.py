"""`nnunet-segmamba synth`: write a generated nnU-Net raw dataset (no download needed)."""

from __future__ import annotations

import argparse
import os

from nnunet_segmamba.datasets.tasks import TASKS, task_from_preset
from nnunet_segmamba.tools.errors import FAILURE, USAGE, report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Write DatasetXXX_NAME (imagesTr/labelsTr/imagesTs/labelsTs, dataset.json) of generated "
                          "volumes into nnUNet_raw. Shapes (every preset but mni): blob_left/blob_right (identical "
                          "objects told apart by their side of the volume), tube (thin, long), speck (a few voxels). "
                          "mni: the MNI152 brain template that nilearn ships, deformed per case, with grey and white "
                          "matter labels split into left and right.")
    parser.add_argument("-d", "--dataset-id", type=int, required=True, help="nnU-Net dataset id (1..999)")
    parser.add_argument("--name", default=None, help="dataset name (default: Synth<Preset>)")
    parser.add_argument("--preset", default="iso", choices=sorted(TASKS), help="task preset (default iso)")
    parser.add_argument("--cases", type=int, default=20, help="training cases (default 20)")
    parser.add_argument("--test-cases", type=int, default=5, help="test cases with labels (default 5)")
    parser.add_argument("--shape", type=int, nargs=3, metavar=("D", "H", "W"), help="override the preset's shape")
    parser.add_argument("--spacing", type=float, nargs=3, metavar=("D", "H", "W"), help="override the spacing (mm)")
    parser.add_argument("--channels", type=int, choices=(1, 2), help="override the number of channels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--raw", default=None, help="raw data root (default: $nnUNet_raw)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing dataset with this id")
    parser.add_argument("-np", "--processes", type=int, default=max(1, (os.cpu_count() or 1) // 2))


MIN_TRAINING_CASES = 5
"""nnU-Net's default split is a 5-fold cross-validation (scikit-learn's KFold): fewer cases fail in nnUNetv2_train."""


def argument_error(args: argparse.Namespace) -> str | None:
    """What is wrong with the arguments, before anything is printed or written; None if nothing."""
    if args.cases < MIN_TRAINING_CASES:
        return (f"--cases {args.cases}: nnU-Net's 5-fold cross-validation needs at least {MIN_TRAINING_CASES} "
                f"training cases (nnUNetv2_train would fail in its split); pass --cases {MIN_TRAINING_CASES} or more")
    if args.test_cases < 0:
        return f"--test-cases {args.test_cases}: give 0 or more test cases"
    if args.processes < 1:
        return f"-np {args.processes}: give 1 or more processes"
    if args.shape and min(args.shape) < 1:
        return f"--shape {' '.join(map(str, args.shape))}: every size must be at least 1 voxel"
    if args.spacing and not min(args.spacing) > 0:
        return f"--spacing {' '.join(map(str, args.spacing))}: every spacing must be positive"
    return None


def main(args: argparse.Namespace) -> int:
    from nnunet_segmamba.datasets.raw import check_target, write_raw_dataset

    raw = args.raw or os.environ.get("nnUNet_raw")
    error = argument_error(args) or (None if raw else "nnUNet_raw is not set; export it or pass --raw DIR")
    if error:
        return report("synth", error, USAGE)
    name = args.name or f"Synth{args.preset.capitalize()}"
    try:
        spec = task_from_preset(args.preset, shape=tuple(args.shape) if args.shape else None,
                                spacing=tuple(args.spacing) if args.spacing else None, channels=args.channels)
        check_target(raw, args.dataset_id, name, args.overwrite)
    except (FileExistsError, ValueError) as error:
        return report("synth", str(error), USAGE)
    print(f"Generating {args.cases} + {args.test_cases} cases of {spec} ...")
    try:
        folder = write_raw_dataset(raw, args.dataset_id, name, spec, args.cases, args.test_cases, args.seed,
                                   args.overwrite, args.processes)
    except OSError as error:
        return report("synth", f"{error}; choose a writable --raw folder with free space", FAILURE)
    print(f"Wrote {folder}\nNext: nnUNetv2_plan_and_preprocess -d {args.dataset_id} --verify_dataset_integrity")
    return 0
