"""Gated spatial convolution (SegMamba, Xing et al. 2024, Eq. 2)."""

from __future__ import annotations

from typing import Sequence

import numpy as np
from torch import Tensor, nn

from nnunet_segmamba.blocks.conv import ConvOps


class GatedSpatialConv(nn.Module):
    """GSC(z) = z + C_k(C_k(z) * C_1(z)).

    C_k: conv with the stage's kernel (3^3 in the paper) -> norm -> nonlinearity; C_1: the same with a
    1^3 kernel; `*` element-wise. z: (B, C, *spatial) -> same shape.
    """

    def __init__(self, channels: int, kernel_size: Sequence[int], ops: ConvOps) -> None:
        super().__init__()
        self.spatial = ops.conv_norm_act(channels, channels, kernel_size)
        self.gate = ops.conv_norm_act(channels, channels, 1)
        self.out = ops.conv_norm_act(channels, channels, kernel_size)

    def forward(self, z: Tensor) -> Tensor:
        return z + self.out(self.spatial(z) * self.gate(z))

    def compute_conv_feature_map_size(self, input_size: Sequence[int]) -> np.int64:
        """Feature-map elements it stores (nnU-Net's planner's memory proxy): three convs and the product."""
        channels = self.out.output_channels
        return np.int64(4 * channels * np.prod(input_size, dtype=np.int64))
