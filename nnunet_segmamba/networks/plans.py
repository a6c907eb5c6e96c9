"""Networks from nnU-Net plans: the one place where plans keys are read and checked."""

from __future__ import annotations

import math
import pydoc
from typing import Any, Sequence

from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager
from torch import nn

RESENC_ONLY_KEYS = ("block", "bottleneck_channels", "stem_channels")
"""Keys of nnU-Net's ResEnc presets that configure its residual encoder, which our networks replace."""


def arch_kwargs(configuration: ConfigurationManager) -> dict[str, Any]:
    """The configuration's ``architecture.arch_kwargs`` with operators imported, without the keys that only
    configure ResEnc's own residual encoder."""
    kwargs = dict(configuration.network_arch_init_kwargs)
    for key in configuration.network_arch_init_kwargs_req_import:
        name = kwargs.get(key)
        if name is None:
            continue
        located = pydoc.locate(name)
        if located is None:
            raise ValueError(f"Plans key architecture.arch_kwargs.{key} = {name!r} cannot be imported. Use a dotted "
                             f"path such as 'torch.nn.Conv3d', 'torch.nn.InstanceNorm3d' or 'torch.nn.LeakyReLU'.")
        kwargs[key] = located
    for key in RESENC_ONLY_KEYS:
        kwargs.pop(key, None)
    return kwargs


def total_stride(strides: Sequence[Sequence[int]]) -> list[int]:
    """Per axis, the product of the stages' strides: every input size must be a multiple of it."""
    return [math.prod(axis) for axis in zip(*strides)]


def check_patch_size(configuration: ConfigurationManager) -> None:
    """The patch must be divisible by the product of the strides on every axis (nnU-Net's planner ensures it;
    hand-edited plans may not)."""
    strides = configuration.network_arch_init_kwargs.get("strides")
    patch = configuration.patch_size
    if not strides or not isinstance(strides[0], (list, tuple)):
        return
    total = total_stride(strides)
    if len(total) != len(patch) or any(p % t for p, t in zip(patch, total)):
        raise ValueError(f"Plans: patch_size {list(patch)} does not fit architecture.arch_kwargs.strides, whose product "
                         f"per axis is {total}: every patch_size entry must be a multiple of it. Fix the edited "
                         f"plans, or re-run nnUNetv2_plan_experiment.")


def build_network(network_class: type[nn.Module], configuration: ConfigurationManager, num_input_channels: int,
                  num_output_channels: int, deep_supervision: bool, **options: Any) -> nn.Module:
    """`network_class` built from a plans configuration; `options` are defaults the plans may override."""
    check_patch_size(configuration)
    network = network_class(input_channels=num_input_channels, num_classes=num_output_channels,
                            deep_supervision=deep_supervision, **{**options, **arch_kwargs(configuration)})
    if hasattr(network, "initialize"):
        network.apply(network.initialize)
    return network


def per_stage(name: str, value: Any, n_stages: int, ndim: int | None = None) -> list:
    """`value` as one entry per stage (an int is repeated; with `ndim`, entries become per-axis lists).

    Raises a ValueError naming the plans key when a list has the wrong length.
    """
    values = list(value) if isinstance(value, (list, tuple)) else [value] * n_stages
    if len(values) != n_stages:
        raise ValueError(f"Plans key architecture.arch_kwargs.{name} has {len(values)} entries but n_stages is "
                         f"{n_stages}: give one entry per stage (edit the plans, or re-run nnUNetv2_plan_experiment).")
    if ndim is None:
        return values
    result = []
    for v in values:
        axes = list(v) if isinstance(v, (list, tuple)) else [v] * ndim
        if len(axes) != ndim:
            raise ValueError(f"Plans key architecture.arch_kwargs.{name} has an entry {v} with {len(axes)} axes; "
                             f"this {ndim}D configuration needs {ndim}.")
        result.append(axes)
    return result

