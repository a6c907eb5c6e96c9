"""What our networks share: the plans' U-Net description and nnU-Net's network contract."""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from dynamic_network_architectures.initialization.weight_init import InitWeights_He
from torch import Tensor, nn

from nnunet_segmamba.blocks.conv import ConvOps
from nnunet_segmamba.networks.plans import per_stage, total_stride


@dataclass(frozen=True)
class UNetPlan:
    """The U-Net that nnU-Net's plans describe (PlainConvUNet's arch_kwargs), one entry per stage."""

    features: list[int]
    kernel_sizes: list[list[int]]
    strides: list[list[int]]
    blocks: list[int]
    """Blocks per encoder stage: n_conv_per_stage (convs), or ResEnc's n_blocks_per_stage (residual blocks)."""
    decoder_blocks: list[int]
    """Convs per decoder stage, deepest first: n_conv_per_stage_decoder."""
    ops: ConvOps
    residual_depth: bool = False
    """True when `blocks` counts ResEnc's residual blocks (two convs each) rather than convs."""

    @property
    def n_stages(self) -> int:
        return len(self.features)

    def residual_blocks(self) -> tuple[list[int], list[int]]:
        """Residual blocks (two convs each) per encoder and decoder stage: as many convs as the plans ask
        for (at least one block), ResEnc's block counts as they are."""
        encoder = self.blocks if self.residual_depth else [max(1, math.ceil(b / 2)) for b in self.blocks]
        return encoder, [max(1, math.ceil(b / 2)) for b in self.decoder_blocks]

    @classmethod
    def from_kwargs(cls, n_stages: int, features_per_stage: int | Sequence[int], conv_op: type[nn.Module],
                    kernel_sizes: int | Sequence, strides: int | Sequence, n_conv_per_stage_decoder: int | Sequence[int],
                    n_conv_per_stage: int | Sequence[int] | None = None,
                    n_blocks_per_stage: int | Sequence[int] | None = None, conv_bias: bool = False,
                    norm_op: type[nn.Module] | None = None, norm_op_kwargs: dict | None = None,
                    dropout_op: type[nn.Module] | None = None, dropout_op_kwargs: dict | None = None,
                    nonlin: type[nn.Module] | None = None, nonlin_kwargs: dict | None = None) -> UNetPlan:
        """PlainConvUNet's arch_kwargs, or ResidualEncoderUNet's (n_blocks_per_stage instead of n_conv_per_stage)."""
        if (n_conv_per_stage is None) == (n_blocks_per_stage is None):
            raise ValueError("Plans architecture.arch_kwargs need exactly one of n_conv_per_stage (PlainConvUNet) "
                             "and n_blocks_per_stage (ResidualEncoderUNet).")
        ops = ConvOps(conv_op, conv_bias, norm_op, norm_op_kwargs or {}, dropout_op, dropout_op_kwargs or {},
                      nonlin, nonlin_kwargs or {})
        depth_key, depth = ("n_conv_per_stage", n_conv_per_stage) if n_blocks_per_stage is None else \
            ("n_blocks_per_stage", n_blocks_per_stage)
        return cls(per_stage("features_per_stage", features_per_stage, n_stages),
                   per_stage("kernel_sizes", kernel_sizes, n_stages, ops.ndim),
                   per_stage("strides", strides, n_stages, ops.ndim),
                   per_stage(depth_key, depth, n_stages),
                   per_stage("n_conv_per_stage_decoder", n_conv_per_stage_decoder, n_stages - 1), ops,
                   residual_depth=n_blocks_per_stage is not None)

    @classmethod
    def parse(cls, kwargs: dict[str, Any], network: type[nn.Module]) -> UNetPlan:
        """`from_kwargs`, with errors that name the plans keys `network` takes."""
        keys = inspect.signature(cls.from_kwargs).parameters
        required = {k for k, p in keys.items() if p.default is inspect.Parameter.empty}
        unknown, missing = sorted(set(kwargs) - set(keys)), sorted(required - set(kwargs))
        if unknown or missing:
            own = [p for p in inspect.signature(network).parameters
                   if p not in ("input_channels", "num_classes", "deep_supervision", "plans")]
            problem = f"does not take {unknown}" if unknown else f"is missing {missing}"
            raise ValueError(f"{network.__name__}: architecture.arch_kwargs {problem}. It takes the plans keys "
                             f"{list(keys)} and its own options {own}.")
        return cls.from_kwargs(**kwargs)


class PlansUNet(nn.Module):
    """Base of our networks: a subclass builds `encoder` and `decoder` from a UNetPlan.

    nnU-Net's contract: forward returns the full-resolution logits, or with `decoder.deep_supervision`
    one output per decoder stage, full resolution first; `compute_conv_feature_map_size` feeds nnU-Net's
    planner; `initialize` is applied by nnU-Net's `get_network_from_plans`.
    """

    encoder: nn.Module
    decoder: nn.Module

    def forward(self, x: Tensor) -> Tensor | list[Tensor]:
        total = total_stride(self.encoder.strides)
        if any(size % stride for size, stride in zip(x.shape[2:], total)):
            raise ValueError(f"{type(self).__name__}: input of spatial size {tuple(x.shape[2:])} is not divisible by "
                             f"the network's total stride {tuple(total)} (the product of the plans' strides). nnU-Net "
                             f"plans choose patch sizes that are; if you edited patch_size or strides, make them agree.")
        return self.decoder(self.encoder(x))

    def compute_conv_feature_map_size(self, input_size: Sequence[int]) -> np.int64:
        """Feature-map elements of one sample, input size without channels (nnU-Net's memory proxy)."""
        return self.encoder.compute_conv_feature_map_size(input_size) + \
            self.decoder.compute_conv_feature_map_size(input_size)

    @staticmethod
    def initialize(module: nn.Module) -> None:
        """He init of the convolutions, as nnU-Net's U-Nets; Mamba and linear layers keep their own init."""
        InitWeights_He(1e-2)(module)
