"""SegMamba (Xing et al., MICCAI 2024) and SegMamba-V2 (Xing et al., IEEE TMI 2025), built from plans.

Both are U-Nets whose encoder stages are convolutional at high resolution and TSMamba blocks (GSC,
multi-order Mamba, MLP) deeper down, with FUE on the skips and nnU-Net's plan-driven decoder. They
differ in what the class attributes say:

| | SegMambaV2 | SegMamba |
|---|---|---|
| downsampling between stages | HSD (kernels 5, 3, 2 in parallel) | strided conv, kernel = stride |
| Mamba scan orders | three plane orientations | ToM: forward, reverse, inter-slice |
| stem | the plans' conv | 7^3 conv |
| Mamba from (largest-axis downsampling) | 8 (1/8 resolution) | 4 (affordable at 128^3) |
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar, Sequence

import numpy as np
from dynamic_network_architectures.building_blocks.unet_decoder import UNetDecoder
from torch import Tensor, nn

from nnunet_segmamba.blocks import (FeatureUncertainty, HierarchicalScaleDownsampling, StridedConvDownsampling,
                                    TSMambaBlock)
from nnunet_segmamba.mamba import TokenOrder, plane_orders, tom_orders
from nnunet_segmamba.networks.unet import PlansUNet, UNetPlan


def mamba_stage_flags(strides: Sequence[Sequence[int]], mamba_downsampling: int) -> list[bool]:
    """True for the stages whose cumulative stride, on its largest axis, is at least `mamba_downsampling`."""
    cumulative = np.cumprod(np.asarray(strides), axis=0).max(axis=1)
    return [bool(c >= mamba_downsampling) for c in cumulative]


class MambaEncoder(nn.Module):
    """Stage 0: stem conv (+ conv blocks); stage s >= 1: `downsampling` by strides[s], then conv blocks,
    or TSMamba blocks on the stages `mamba_stage_flags` selects; plan.blocks[s] blocks per stage.
    mamba=False: the TSMamba blocks' mixers are identities (the No-Mamba ablation).

    forward: x (B, C_in, *spatial), spatial divisible by the total stride -> the stage outputs,
    shallowest first, all but the deepest passed through FUE (they are the decoder's skips).
    """

    def __init__(self, input_channels: int, plan: UNetPlan, downsampling: type[nn.Module],
                 orders: Sequence[TokenOrder], mamba_downsampling: int, stem_kernel_size: int | None = None,
                 mlp_ratio: float = 2.0, d_state: int = 16, scan_backend: str | None = None,
                 mamba: bool = True) -> None:
        super().__init__()
        ops = plan.ops
        self.mamba_stages = mamba_stage_flags(plan.strides, mamba_downsampling)
        stem_kernel = [k if stem_kernel_size is None or k == 1 else stem_kernel_size for k in plan.kernel_sizes[0]]
        stages, channels = [], input_channels
        for s, (features, kernel, stride, n_blocks, tsmamba) in enumerate(
                zip(plan.features, plan.kernel_sizes, plan.strides, plan.blocks, self.mamba_stages)):
            if s == 0:
                entry, n_body = ops.conv_norm_act(channels, features, stem_kernel, stride), n_blocks - (not tsmamba)
            else:
                entry, n_body = downsampling(channels, features, stride, ops), n_blocks
            body = [TSMambaBlock(features, kernel, ops, orders, mlp_ratio, d_state, backend=scan_backend, mamba=mamba)
                    if tsmamba else ops.conv_norm_act(features, features, kernel) for _ in range(n_body)]
            stages.append(nn.Sequential(entry, *body))
            channels = features
        self.stages = nn.ModuleList(stages)
        self.fue = FeatureUncertainty()
        # what dynamic-network-architectures' UNetDecoder reads from an encoder
        self.output_channels = list(plan.features)
        self.strides = plan.strides
        self.kernel_sizes = plan.kernel_sizes
        for name, value in ops.as_encoder_attributes().items():
            setattr(self, name, value)

    def forward(self, x: Tensor) -> list[Tensor]:
        outputs = []
        for stage in self.stages:
            x = stage(x)
            outputs.append(x)
        return [self.fue(skip) for skip in outputs[:-1]] + outputs[-1:]

    def compute_conv_feature_map_size(self, input_size: Sequence[int]) -> np.int64:
        total = np.int64(0)
        for stage, stride in zip(self.stages, self.strides):
            entry, *body = stage
            total += entry.compute_conv_feature_map_size(input_size)
            input_size = [i // s for i, s in zip(input_size, stride)]
            for block in body:
                total += block.compute_conv_feature_map_size(input_size)
        return total


class MambaUNet(PlansUNet):
    """MambaEncoder + nnU-Net's UNetDecoder, from the plans' architecture kwargs (`UNetPlan`) plus:

    - mamba_downsampling: stages downsampled at least this much (largest axis) use TSMamba blocks;
      default: the class's `default_mamba_downsampling`.
    - mlp_ratio, d_state, scan_backend: the TSMamba blocks' MLP width, state size and scan backend.
    - mamba: False replaces every Mamba mixer by an identity without parameters, all else unchanged (the
      No-Mamba ablation: what the Mamba layers add).

    Subclasses set the class attributes below.
    """

    downsampling: ClassVar[type[nn.Module]]
    scan_orders: ClassVar[Callable[[int], tuple[TokenOrder, ...]]]
    stem_kernel_size: ClassVar[int | None]
    default_mamba_downsampling: ClassVar[int]

    def __init__(self, input_channels: int, num_classes: int, deep_supervision: bool = False,
                 mamba_downsampling: int | None = None, mlp_ratio: float = 2.0, d_state: int = 16,
                 scan_backend: str | None = None, mamba: bool = True, **plans: Any) -> None:
        super().__init__()
        plan = UNetPlan.parse(plans, type(self))
        self.encoder = MambaEncoder(
            input_channels, plan, self.downsampling, self.scan_orders(plan.ops.ndim),
            self.default_mamba_downsampling if mamba_downsampling is None else mamba_downsampling,
            self.stem_kernel_size, mlp_ratio, d_state, scan_backend, mamba)
        self.decoder = UNetDecoder(self.encoder, num_classes, plan.decoder_blocks, deep_supervision)


class SegMambaV2(MambaUNet):
    """SegMamba-V2: HSD downsampling, tri-orientated spatial Mamba from 1/8 resolution, GSC, FUE."""

    downsampling = HierarchicalScaleDownsampling
    scan_orders = staticmethod(plane_orders)
    stem_kernel_size = None
    default_mamba_downsampling = 8


class SegMamba(MambaUNet):
    """SegMamba: 7^3 stem, tri-orientated Mamba (ToM) from 1/4 resolution, GSC, FUE."""

    downsampling = StridedConvDownsampling
    scan_orders = staticmethod(tom_orders)
    stem_kernel_size = 7
    default_mamba_downsampling = 4
