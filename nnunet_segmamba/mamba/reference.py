"""Token-by-token selective scan: the equations as written, for tests, benchmarks and `doctor`.

O(L) Python steps and autograd nodes; computes in the dtype it is given (float64 for references).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def selective_scan_reference(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
) -> Tensor:
    """h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t;  y_t = C_t . h_t + D u_t;  out = y * silu(z).

    Shapes as `nnunet_segmamba.mamba.scan.selective_scan`.
    """
    batch, dim, length = u.shape
    B = B.unsqueeze(1) if B.dim() == 3 else B
    C = C.unsqueeze(1) if C.dim() == 3 else C
    per_group = dim // B.shape[1]
    B = B.repeat_interleave(per_group, dim=1)  # (batch, dim, N, L)
    C = C.repeat_interleave(per_group, dim=1)
    if delta_bias is not None:
        delta = delta + delta_bias.unsqueeze(-1)
    if delta_softplus:
        delta = F.softplus(delta)
    h = u.new_zeros(batch, dim, A.shape[-1])
    ys = []
    for t in range(length):
        dt = delta[..., t].unsqueeze(-1)
        h = torch.exp(dt * A) * h + dt * B[..., t] * u[..., t].unsqueeze(-1)
        ys.append((h * C[..., t]).sum(-1))
    y = torch.stack(ys, dim=-1)
    if D is not None:
        y = y + D.unsqueeze(-1) * u
    if z is not None:
        y = y * F.silu(z)
    return y
