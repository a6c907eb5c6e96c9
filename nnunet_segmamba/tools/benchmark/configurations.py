"""The plans configuration a benchmark runs at: a built-in preset, a plans file or a dataset's plans, and the
ResEnc row's variant of it."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager

PRESETS = {
    "3d_128": {"patch_size": [128, 128, 128], "batch_size": 2, "features": [32, 64, 128, 256, 320, 320],
               "strides": [[1, 1, 1]] + [[2, 2, 2]] * 5, "kernels": [[3, 3, 3]] * 6},
    "3d_64": {"patch_size": [64, 64, 64], "batch_size": 2, "features": [32, 64, 128, 256, 320],
              "strides": [[1, 1, 1]] + [[2, 2, 2]] * 4, "kernels": [[3, 3, 3]] * 5},
    "2d_512": {"patch_size": [512, 512], "batch_size": 12, "features": [32, 64, 128, 256, 512, 512, 512, 512],
               "strides": [[1, 1]] + [[2, 2]] * 7, "kernels": [[3, 3]] * 8},
}
"""nnU-Net's default plans for isotropic data at these patch sizes (what nnUNetv2_plan_experiment emits)."""

RESENC_BLOCKS = (1, 3, 4, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6)
"""Encoder blocks per stage of nnU-Net's ResEnc presets (M, L and XL differ only in their memory target,
hence patch and batch); one conv per decoder stage."""
RESENC_ROW = "nnUNetTrainer (ResEnc)"


class BenchmarkError(Exception):
    """A bad argument or missing input: printed as one line, exit code 2."""


def resenc_configuration(configuration: ConfigurationManager) -> ConfigurationManager:
    """`configuration`'s geometry (patch, strides, kernels, features) with nnU-Net's ResEnc UNet, as its ResEnc
    planners write it: the ResEnc-L network at this patch."""
    from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager

    architecture = configuration.configuration["architecture"]
    kwargs = {k: v for k, v in architecture["arch_kwargs"].items() if k != "n_conv_per_stage"}
    n_stages = kwargs["n_stages"]
    kwargs.update(n_blocks_per_stage=list(RESENC_BLOCKS[:n_stages]), n_conv_per_stage_decoder=[1] * (n_stages - 1))
    return ConfigurationManager({**configuration.configuration, "architecture": {
        **architecture, "network_class_name": "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet",
        "arch_kwargs": kwargs}})


def preset_plans(name: str, in_channels: int) -> dict:
    """A plans dict (nnU-Net's format) holding one configuration, `name`."""
    preset = PRESETS[name]
    dim = len(preset["patch_size"])
    n_stages = len(preset["features"])
    arch_kwargs = {
        "n_stages": n_stages, "features_per_stage": preset["features"], "conv_op": f"torch.nn.modules.conv.Conv{dim}d",
        "kernel_sizes": preset["kernels"], "strides": preset["strides"], "n_conv_per_stage": [2] * n_stages,
        "n_conv_per_stage_decoder": [2] * (n_stages - 1), "conv_bias": True,
        "norm_op": f"torch.nn.modules.instancenorm.InstanceNorm{dim}d", "norm_op_kwargs": {"eps": 1e-5, "affine": True},
        "dropout_op": None, "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True},
    }
    configuration = {
        "data_identifier": name, "preprocessor_name": "DefaultPreprocessor", "batch_size": preset["batch_size"],
        "patch_size": preset["patch_size"], "spacing": [1.0] * dim, "normalization_schemes": ["ZScoreNormalization"] * in_channels,
        "use_mask_for_norm": [False] * in_channels, "batch_dice": False,
        "architecture": {"network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
                         "arch_kwargs": arch_kwargs, "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]},
    }
    return {"dataset_name": f"Preset_{name}", "plans_name": "nnUNetPlans", "configurations": {name: configuration},
            "original_median_spacing_after_transp": [1.0] * dim, "image_reader_writer": "NibabelIO",
            "transpose_forward": list(range(dim)), "transpose_backward": list(range(dim)),
            "label_manager": "LabelManager", "foreground_intensity_properties_per_channel": {}}


def load_configuration(args: argparse.Namespace) -> tuple[dict, str, int, int]:
    """(plans dict, configuration name, input channels, output channels) from the arguments."""
    from batchgenerators.utilities.file_and_folder_operations import load_json

    if args.preset:
        return preset_plans(args.preset, args.in_channels), args.preset, args.in_channels, args.num_classes
    if args.plans_file:
        plans_file = Path(args.plans_file)
        if not plans_file.is_file():
            raise BenchmarkError(f"no plans file {plans_file}")
        plans, dataset_json = load_json(str(plans_file)), None
    else:
        from nnunetv2.paths import nnUNet_preprocessed
        from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

        if not nnUNet_preprocessed.is_set():
            raise BenchmarkError("nnUNet_preprocessed is not set; export it, or use --preset / --plans-file")
        try:
            folder = Path(nnUNet_preprocessed.get()) / maybe_convert_to_dataset_name(args.dataset)
        except RuntimeError as error:
            raise BenchmarkError(str(error).split(". ")[0]) from None
        plans_file = folder / f"{args.plans}.json"
        if not plans_file.is_file():
            raise BenchmarkError(f"no plans file {plans_file}; run nnUNetv2_plan_and_preprocess -d {args.dataset}")
        plans, dataset_json = load_json(str(plans_file)), load_json(str(folder / "dataset.json"))
    if args.configuration not in plans["configurations"]:
        raise BenchmarkError(f"{plans_file} has no configuration {args.configuration!r}; it has "
                             f"{', '.join(plans['configurations'])}")
    if dataset_json is None:
        return plans, args.configuration, args.in_channels, args.num_classes
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    manager = PlansManager(plans)
    in_channels = determine_num_input_channels(manager, manager.get_configuration(args.configuration), dataset_json)
    return plans, args.configuration, in_channels, manager.get_label_manager(dataset_json).num_segmentation_heads
