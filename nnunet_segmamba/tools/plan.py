"""`nnunet-segmamba plan`: plans whose patch and batch sizes fit our network in a GPU memory target.

nnU-Net's `-pl` only finds planners inside nnunetv2, so ours run from here. Needs the dataset fingerprint
(nnUNetv2_extract_fingerprint or nnUNetv2_plan_and_preprocess); writes nnUNetPlans_<network>_<target>G.json
next to nnU-Net's plans and prints how to preprocess (only where nnU-Net's data cannot be reused) and train.
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

from nnunet_segmamba.tools.errors import FAILURE, USAGE, report

TRAINERS = {"SegMambaV2": "nnUNetTrainerSegMambaV2", "SegMamba": "nnUNetTrainerSegMamba",
            "MambaClinix": "nnUNetTrainerMambaClinix"}


class PlanError(Exception):
    pass


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__.splitlines()[0].split(": ", 1)[1]
    parser.add_argument("-d", "--dataset", required=True, help="dataset id or name")
    parser.add_argument("-pl", "--planner", required=True, choices=sorted(TRAINERS), help="the network to plan for")
    parser.add_argument("-gpu_memory_target", "--gpu-memory-target", type=float, default=8.0,
                        help="GiB a training step may use (default 8, as nnU-Net)")
    parser.add_argument("-overwrite_plans_name", "--plans-name", default=None,
                        help="default: nnUNetPlans_<network>_<target>G")


def _dataset_name(dataset: str) -> str:
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    for variable in ("nnUNet_raw", "nnUNet_preprocessed"):
        if not os.environ.get(variable):
            raise PlanError(f"{variable} is not set: export it as for nnUNetv2_plan_and_preprocess")
    try:
        name = maybe_convert_to_dataset_name(int(dataset) if dataset.isdigit() else dataset)
    except RuntimeError as error:
        raise PlanError(str(error).split(". ")[0]) from None
    fingerprint = Path(os.environ["nnUNet_preprocessed"]) / name / "dataset_fingerprint.json"
    if not fingerprint.is_file():
        raise PlanError(f"no fingerprint {fingerprint}: run nnUNetv2_extract_fingerprint -d {dataset} "
                        f"(or nnUNetv2_plan_and_preprocess -d {dataset}) first")
    raw = Path(os.environ["nnUNet_raw"]) / name
    if not (raw / "dataset.json").is_file() or not any((raw / "imagesTr").glob("*")):
        raise PlanError(f"no raw dataset in {raw} (dataset.json and imagesTr/): nnU-Net's planner reads them, even "
                        f"with the fingerprint and preprocessed data present; restore the raw dataset or point "
                        f"nnUNet_raw to the folder that holds it")
    return name


def main(args: argparse.Namespace) -> int:
    from nnunet_segmamba.plans.planners import PLANNERS

    target = args.gpu_memory_target
    try:
        if not (target > 0 and math.isfinite(target)):
            raise PlanError(f"-gpu_memory_target must be a positive number of GiB, not {target}")
        dataset = _dataset_name(str(args.dataset))
        planner = PLANNERS[args.planner](dataset, gpu_memory_target_in_gb=target, plans_name=args.plans_name)
        plans = planner.plan_experiment()
    except (PlanError, ValueError) as error:
        return report("plan", str(error), USAGE)
    except OSError as error:  # the plans file cannot be written
        return report("plan", f"{error}; check that nnUNet_preprocessed is writable", FAILURE)
    folder = Path(os.environ["nnUNet_preprocessed"]) / dataset
    name = planner.plans_identifier
    print(f"\n{args.planner} plans for {target:g} GiB: {folder / (name + '.json')}")
    print(f"memory model: {planner.memory_model}")
    missing = []
    for configuration_name, configuration in plans["configurations"].items():
        if "patch_size" not in configuration:  # 3d_cascade_fullres inherits 3d_fullres
            continue
        architecture = configuration["architecture"]
        estimate = planner.estimate_gib(configuration["patch_size"], architecture["arch_kwargs"],
                                        architecture["_kw_requires_import"], configuration["batch_size"])
        data = configuration["data_identifier"]
        ready = (folder / data).is_dir()
        if not ready:
            missing.append(configuration_name)
        print(f"  {configuration_name}: patch {configuration['patch_size']}, batch {configuration['batch_size']}, "
              f"estimated peak {estimate:.1f} GiB; data {data} ({'preprocessed' if ready else 'to preprocess'})")
    if missing:
        print(f"\nPreprocess:  nnUNetv2_preprocess -d {args.dataset} -plans_name {name} -c {' '.join(missing)}")
    print(f"Train:       nnUNetv2_train {args.dataset} CONFIGURATION FOLD -tr {TRAINERS[args.planner]} -p {name}"
          f"   (CONFIGURATION: {', '.join(plans['configurations'])})")
    return 0
