"""Downsampling between encoder stages: HSD (SegMamba-V2) and a plain strided convolution (SegMamba).

Both take (in_channels, out_channels, stride, ops) and map (B, C_in, *spatial) to
(B, C_out, *spatial // stride) for spatial sizes divisible by the stride (as nnU-Net plans guarantee).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from nnunet_segmamba.blocks.conv import ConvOps

BRANCH_KERNELS = (5, 3, None)
"""Kernel per axis of each parallel branch; None means 'the axis' stride' (kernel 2 for stride 2)."""


def branch_geometry(kernel: int | None, stride: int) -> tuple[int, int]:
    """(kernel, padding) of one branch along one axis so that the output is input // stride.

    Odd kernels use padding (k - 1) // 2; the stride-sized branch tiles the axis without overlap, which
    for a stride-1 axis is a kernel-1 conv.
    """
    if kernel is None:
        return stride, 0
    return kernel, (kernel - 1) // 2


class HierarchicalScaleDownsampling(nn.Module):
    """HSD: parallel strided convolutions with kernels 5, 3 and the stride (2), fused by a 1^3 conv.

        y = act(norm(conv_1( concat_i conv_{k_i, stride}(x) )))

    x: (B, C_in, *spatial) -> (B, C_out, *spatial // stride). Works per axis, so anisotropic strides such
    as (1, 2, 2) keep the stride-1 axis at full size ('same' padding there).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: Sequence[int], ops: ConvOps) -> None:
        super().__init__()
        self.stride = tuple(stride)
        self.out_channels = out_channels
        branches = []
        for kernel in BRANCH_KERNELS:
            geometry = [branch_geometry(kernel, s) for s in self.stride]
            branches.append(ops.conv_op(in_channels, out_channels, [k for k, _ in geometry], self.stride,
                                        padding=[p for _, p in geometry], bias=ops.conv_bias))
        self.branches = nn.ModuleList(branches)
        self.fuse = ops.conv_norm_act(len(branches) * out_channels, out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.fuse(torch.cat([branch(x) for branch in self.branches], dim=1))

    def compute_conv_feature_map_size(self, input_size: Sequence[int]) -> np.int64:
        output_size = [i // s for i, s in zip(input_size, self.stride)]
        return np.int64((len(self.branches) + 1) * self.out_channels * np.prod(output_size, dtype=np.int64))


class StridedConvDownsampling(nn.Module):
    """act(norm(conv_{k=stride, stride}(x))): SegMamba's downsampling layer, non-overlapping patches."""

    def __init__(self, in_channels: int, out_channels: int, stride: Sequence[int], ops: ConvOps) -> None:
        super().__init__()
        self.stride = tuple(stride)
        self.conv = ops.conv_norm_act(in_channels, out_channels, self.stride, self.stride)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)

    def compute_conv_feature_map_size(self, input_size: Sequence[int]) -> np.int64:
        return self.conv.compute_conv_feature_map_size(input_size)
