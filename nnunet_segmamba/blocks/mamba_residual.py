"""MambaClinix's residual Mamba layer: one raster scan over a stage's voxels, computed in fp32."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from nnunet_segmamba.mamba import Mamba, TokenIdentity


class ResidualMambaLayer(nn.Module):
    """t = tokens(x);  out = t + Linear(LN(Mamba(LN(t))))   x: (B, C, *spatial) -> same shape and dtype.

    The tokens are the voxels in raster order, C features each; Mamba scans them once (d_state 16,
    d_conv 4, expand 2 by default). Everything runs in fp32 with autocast off, as MambaClinix does: the
    input is upcast and the output cast back to its dtype (Mamba layers under fp16 AMP give NaN losses).
    With mamba=False the Mamba layer is `TokenIdentity` (the No-Mamba ablation), all else unchanged.
    """

    def __init__(self, channels: int, d_state: int = 16, d_conv: int = 4, expand: int = 2,
                 backend: str | None = None, mamba: bool = True) -> None:
        super().__init__()
        self.norm_in = nn.LayerNorm(channels)
        self.mamba = Mamba(channels, d_state=d_state, d_conv=d_conv, expand=expand,
                           backend=backend) if mamba else TokenIdentity()
        self.norm_out = nn.LayerNorm(channels)
        self.proj = nn.Linear(channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        with torch.autocast(x.device.type, enabled=False):
            tokens = x.float().flatten(2).transpose(1, 2)
            tokens = tokens + self.proj(self.norm_out(self.mamba(self.norm_in(tokens))))
            return tokens.transpose(1, 2).reshape(x.shape).to(x.dtype)

    def compute_conv_feature_map_size(self, input_size: Sequence[int]) -> np.int64:
        """fp32 tokens, two norms, the Mamba layer (in_proj 2 d_inner, conv, scan, gate: 3 d_inner, out;
        nothing for the identity), the linear layer and the residual sum."""
        channels = self.proj.in_features
        inner = self.mamba.d_inner if isinstance(self.mamba, Mamba) else 0
        return np.int64((6 * channels + 5 * inner) * np.prod(input_size, dtype=np.int64))
