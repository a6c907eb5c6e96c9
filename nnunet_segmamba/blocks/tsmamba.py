"""The TSMamba block of SegMamba and SegMamba-V2 (GSC, then a multi-order Mamba and an MLP on tokens)."""

from __future__ import annotations

from typing import Sequence

import numpy as np
from torch import Tensor, nn

from nnunet_segmamba.blocks.conv import ConvOps
from nnunet_segmamba.blocks.gsc import GatedSpatialConv
from nnunet_segmamba.mamba import Mamba, TokenIdentity, TokenOrder


class TSMambaBlock(nn.Module):
    """GSC -> LN -> Mamba over `orders` -> +residual -> LN -> MLP -> +residual.

        z = GSC(x);  t = tokens(z)
        t = t + Mamba(LN(t));  t = t + MLP(LN(t))

    The orders make the mixer: SegMamba's ToM (`tom_orders`) or SegMamba-V2's tri-orientated spatial
    Mamba (`plane_orders`); with mamba=False it is `TokenIdentity` (the No-Mamba ablation: t = t + LN(t)
    there, all else unchanged). x: (B, C, *spatial) -> same shape.
    """

    def __init__(self, channels: int, kernel_size: Sequence[int], ops: ConvOps, orders: Sequence[TokenOrder],
                 mlp_ratio: float = 2.0, d_state: int = 16, d_conv: int = 4, expand: int = 2,
                 backend: str | None = None, mamba: bool = True) -> None:
        super().__init__()
        self.gsc = GatedSpatialConv(channels, kernel_size, ops)
        self.norm_mixer = nn.LayerNorm(channels)
        self.mixer = Mamba(channels, d_state=d_state, d_conv=d_conv, expand=expand, orders=orders,
                           backend=backend) if mamba else TokenIdentity()
        self.norm_mlp = nn.LayerNorm(channels)
        hidden = int(mlp_ratio * channels)
        self.mlp = nn.Sequential(nn.Linear(channels, hidden), nn.GELU(), nn.Linear(hidden, channels))

    def forward(self, x: Tensor) -> Tensor:
        x = self.gsc(x)
        grid = x.shape[2:]
        tokens = x.flatten(2).transpose(1, 2)
        tokens = tokens + self.mixer(self.norm_mixer(tokens), grid)
        tokens = tokens + self.mlp(self.norm_mlp(tokens))
        return tokens.transpose(1, 2).reshape(x.shape)

    def compute_conv_feature_map_size(self, input_size: Sequence[int]) -> np.int64:
        """Stored activations in units of feature-map elements: GSC, the Mamba mixer's K ordered copies of
        2 * d_inner channels plus its projections (none for the identity), the MLP's hidden layer, two norms
        and two residuals."""
        channels, voxels = self.mlp[0].in_features, np.prod(input_size, dtype=np.int64)
        mixer = (2 + 2 * len(self.mixer.orders)) * self.mixer.d_inner if isinstance(self.mixer, Mamba) else 0
        mlp = self.mlp[0].out_features
        return self.gsc.compute_conv_feature_map_size(input_size) + np.int64((mixer + mlp + 4 * channels) * voxels)
