"""Feature-level uncertainty estimation on skip connections (SegMamba, Xing et al. 2024, Sec. 2.4)."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class FeatureUncertainty(nn.Module):
    """FUE: z_bar = sigmoid(mean_c z);  u = -z_bar * log(z_bar);  out = z + z * (1 - u).

    Parameter-free. z: (B, C, *spatial) -> same shape; u is shared by all channels of a voxel.
    """

    def forward(self, z: Tensor) -> Tensor:
        z_bar = torch.sigmoid(z.mean(dim=1, keepdim=True))
        uncertainty = -torch.special.xlogy(z_bar, z_bar)  # 0 where z_bar underflows to 0
        return z * (2 - uncertainty)
