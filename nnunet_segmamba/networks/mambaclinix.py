"""MambaClinix (Bian et al., arXiv 2409.12533), built from nnU-Net plans.

A residual U-Net whose encoder stages each end in a global-context block: an HGCN block (recursive gated
convolution of order s + 2 at stage s) on the shallow stages, a residual Mamba layer on the deeper ones
(the "adaptive stage-wise framework"). The decoder upsamples, merges the skip through a residual block
and has a segmentation head per stage.

Plans depth (`UNetPlan.residual_blocks`): an encoder stage opens with residual blocks (BasicBlockD, two
convs each, the first strided) holding as many convs as ``n_conv_per_stage`` asks for (nnU-Net's default 2:
one block, the paper's design), or ResEnc's ``n_blocks_per_stage`` blocks; a decoder stage merges skip and
upsampled features with ``n_conv_per_stage_decoder`` / 2 blocks (at least one).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nnunet_segmamba.blocks.conv import ConvOps
from nnunet_segmamba.blocks.hgcn import HGCNBlock
from nnunet_segmamba.blocks.mamba_residual import ResidualMambaLayer
from nnunet_segmamba.networks.unet import PlansUNet, UNetPlan

INTERPOLATION = {1: "linear", 2: "bilinear", 3: "trilinear"}


class MambaClinixEncoder(nn.Module):
    """Stem conv, then per stage s: residual blocks (the first strided by strides[s]) followed by an HGCN
    block of order s + 2 for s < hgcn_stages, else a residual Mamba layer (its Mamba an identity with mamba=False).

    forward: x (B, C_in, *spatial) -> the n_stages stage outputs, shallowest first.
    """

    def __init__(self, input_channels: int, plan: UNetPlan, hgcn_stages: int, layer_scale_init: float,
                 drop_path_rate: float, d_state: int, scan_backend: str | None, mamba: bool) -> None:
        super().__init__()
        ops = plan.ops
        if not 0 <= hgcn_stages <= plan.n_stages:
            raise ValueError(f"hgcn_stages must be between 0 and n_stages ({plan.n_stages}), got {hgcn_stages}.")
        self.strides = plan.strides
        self.mamba_stages = [s >= hgcn_stages for s in range(plan.n_stages)]
        self.stem = ops.conv_norm_act(input_channels, plan.features[0], plan.kernel_sizes[0])
        stages, channels = [], plan.features[0]
        for s, (features, kernel, stride, n_blocks) in enumerate(
                zip(plan.features, plan.kernel_sizes, plan.strides, plan.residual_blocks()[0])):
            if self.mamba_stages[s]:
                context = ResidualMambaLayer(features, d_state, backend=scan_backend, mamba=mamba)
            else:  # stochastic depth grows linearly to drop_path_rate at the deepest HGCN stage
                context = HGCNBlock(features, kernel, s + 2, ops, layer_scale_init,
                                    drop_path_rate * (s + 1) / hgcn_stages)
            stages.append(nn.Sequential(ops.residual_blocks(n_blocks, channels, features, kernel, stride), context))
            channels = features
        self.stages = nn.ModuleList(stages)

    def forward(self, x: Tensor) -> list[Tensor]:
        x = self.stem(x)
        outputs = []
        for stage in self.stages:
            x = stage(x)
            outputs.append(x)
        return outputs

    def compute_conv_feature_map_size(self, input_size: Sequence[int]) -> np.int64:
        total = self.stem.compute_conv_feature_map_size(input_size)
        for (blocks, context), stride in zip(self.stages, self.strides):
            total += blocks.compute_conv_feature_map_size(input_size)
            input_size = [i // s for i, s in zip(input_size, stride)]
            total += context.compute_conv_feature_map_size(input_size)
        return total


class UpStage(nn.Module):
    """One decoder stage: below (B, C_below, *s / stride), skip (B, C, *s) -> (B, C, *s).

        up  = interpolate(conv_1(below))           # 1^3 conv, then (bi/tri)linear upsampling to the skip's size
        out = ResBlocks(concat(up, ResBlock(skip)))   # 2C -> C

    A 1^3 conv mixes channels per voxel and linear interpolation mixes voxels per channel with weights
    summing to 1, so the two commute: projecting first is the same map at 1/prod(stride) of the cost.
    """

    def __init__(self, below_channels: int, channels: int, kernel_size: Sequence[int], n_blocks: int,
                 ops: ConvOps) -> None:
        super().__init__()
        self.project = ops.conv_op(below_channels, channels, 1, bias=ops.conv_bias)
        self.mode = INTERPOLATION[ops.ndim]
        self.skip = ops.residual_blocks(1, channels, channels, kernel_size)
        self.merge = ops.residual_blocks(n_blocks, 2 * channels, channels, kernel_size)

    def forward(self, below: Tensor, skip: Tensor) -> Tensor:
        up = F.interpolate(self.project(below), size=skip.shape[2:], mode=self.mode, align_corners=False)
        return self.merge(torch.cat((up, self.skip(skip)), dim=1))

    def compute_conv_feature_map_size(self, skip_size: Sequence[int]) -> np.int64:
        """The upsampled projection, the skip's block, the concatenation and the merging blocks
        (the projection at low resolution is left out: < 1/2 of the upsampled map)."""
        channels = self.project.out_channels
        voxels = np.prod(skip_size, dtype=np.int64)
        return (np.int64(3 * channels * voxels) + self.skip.compute_conv_feature_map_size(skip_size)
                + self.merge.compute_conv_feature_map_size(skip_size))


class MambaClinixDecoder(nn.Module):
    """Residual decoder with a 1^3 segmentation head per stage.

    forward: the encoder's stage outputs -> logits (B, num_classes, *spatial of stage 0), or with
    `deep_supervision` one output per decoder stage, full resolution first (nnU-Net toggles the attribute).
    """

    def __init__(self, plan: UNetPlan, num_classes: int, deep_supervision: bool) -> None:
        super().__init__()
        self.deep_supervision = deep_supervision
        self.strides = plan.strides
        self.num_classes = num_classes
        deepest_first = reversed(range(plan.n_stages - 1))  # decoder_blocks[0] is the deepest decoder stage
        self.stages = nn.ModuleList(
            UpStage(plan.features[s + 1], plan.features[s], plan.kernel_sizes[s], n_blocks, plan.ops)
            for s, n_blocks in zip(deepest_first, plan.residual_blocks()[1]))
        self.seg_layers = nn.ModuleList(
            plan.ops.conv_op(plan.features[s], num_classes, 1, bias=True) for s in reversed(range(plan.n_stages - 1)))

    def forward(self, skips: list[Tensor]) -> Tensor | list[Tensor]:
        x, outputs = skips[-1], []
        for i, (stage, head, skip) in enumerate(zip(self.stages, self.seg_layers, reversed(skips[:-1]))):
            x = stage(x, skip)
            if self.deep_supervision or i == len(self.stages) - 1:
                outputs.append(head(x))
        return outputs[::-1] if self.deep_supervision else outputs[-1]

    def compute_conv_feature_map_size(self, input_size: Sequence[int]) -> np.int64:
        """input_size: the network's input (spatial); each stage works at its skip's size."""
        skip_sizes = []
        for stride in self.strides[:-1]:
            input_size = [i // s for i, s in zip(input_size, stride)]
            skip_sizes.append(input_size)
        total = np.int64(0)
        for i, (stage, size) in enumerate(zip(self.stages, reversed(skip_sizes))):
            total += stage.compute_conv_feature_map_size(size)
            if self.deep_supervision or i == len(self.stages) - 1:
                total += np.int64(self.num_classes * np.prod(size, dtype=np.int64))
        return total


class MambaClinix(PlansUNet):
    """MambaClinix from the plans' architecture kwargs (`UNetPlan`) plus its own options:

    - hgcn_stages: stages ending in an HGCN block (the rest end in a Mamba layer); default
      ceil(n_stages / 2), the paper's split.
    - layer_scale_init: initial per-channel layer scale of the HGCN branch (HorNet's 1e-6).
    - drop_path_rate: stochastic depth of the deepest HGCN stage (linear from the first); 0 = off.
    - d_state, scan_backend: the Mamba layers' state size and scan implementation.
    - mamba: False replaces every Mamba layer by an identity without parameters, all else unchanged (the
      No-Mamba ablation: what the Mamba layers add).
    """

    def __init__(self, input_channels: int, num_classes: int, deep_supervision: bool = False,
                 hgcn_stages: int | None = None, layer_scale_init: float = 1e-6, drop_path_rate: float = 0.0,
                 d_state: int = 16, scan_backend: str | None = None, mamba: bool = True, **plans: Any) -> None:
        super().__init__()
        plan = UNetPlan.parse(plans, type(self))
        self.encoder = MambaClinixEncoder(
            input_channels, plan, math.ceil(plan.n_stages / 2) if hgcn_stages is None else hgcn_stages,
            layer_scale_init, drop_path_rate, d_state, scan_backend, mamba)
        self.decoder = MambaClinixDecoder(plan, num_classes, deep_supervision)
