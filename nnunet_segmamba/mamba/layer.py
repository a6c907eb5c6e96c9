"""The Mamba (v1, selective state space) mixer, over tokens scanned in one or several orders."""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nnunet_segmamba.mamba.backends import requested_backend, scan_ops
from nnunet_segmamba.mamba.orders import TokenOrder, raster_order


class Mamba(nn.Module):
    """Mamba mixer (Gu & Dao 2023, Fig. 3) whose scan runs over the tokens in K orders.

    With the default single order this is mamba_ssm's ``Mamba``: the same parameters under the same
    names and shapes (in_proj, conv1d, x_proj, dt_proj, A_log, D, out_proj), so state dicts load both
    ways. With K orders the input and output projections are shared and each order has its own conv1d,
    x_proj, dt_proj, A_log and D, stacked along the channel axis (order k owns rows k*d_inner...), and all
    orders run in one kernel call, B and C as K groups:

        x, z = in_proj(tokens)
        y    = sum_k unorder_k( SSM_k( SiLU(conv1d_k(order_k(x))) ) )
        out  = out_proj(y * SiLU(z))

    SSM_k is the selective scan (see `nnunet_segmamba.mamba.scan`) with delta = softplus(dt_proj_k(dt)),
    A = -exp(A_log_k). Gating by z after the sum equals gating each order (z is per token).

    forward: tokens (B, L, d_model), row-major over `grid` (prod(grid) = L) -> (B, L, d_model).
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: int | str = "auto",
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        orders: Sequence[TokenOrder] | None = None,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        self.d_model, self.d_state, self.d_conv = d_model, d_state, d_conv
        self.d_inner = expand * d_model
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        self.orders = tuple(orders) if orders is not None else (raster_order(1),)
        self.backend = None if backend is None else requested_backend(backend)
        k, inner = len(self.orders), self.d_inner

        self.in_proj = nn.Linear(d_model, 2 * inner, bias=False)
        self.conv1d = nn.Conv1d(k * inner, k * inner, d_conv, groups=k * inner, padding=d_conv - 1)
        self.x_proj = nn.Linear(inner, k * (self.dt_rank + 2 * d_state), bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, k * inner, bias=True)
        self.A_log = nn.Parameter(torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(k * inner, 1))
        self.D = nn.Parameter(torch.ones(k * inner))
        self.out_proj = nn.Linear(inner, d_model, bias=False)

        # dt_proj as in Mamba: weight ~ U(+-dt_rank^-0.5), softplus(bias) log-uniform in [dt_min, dt_max].
        bound = self.dt_rank**-0.5
        nn.init.uniform_(self.dt_proj.weight, -bound, bound)
        dt = torch.exp(torch.rand(k * inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=dt_init_floor)
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus

    def forward(self, tokens: Tensor, grid: Sequence[int] | None = None) -> Tensor:
        batch, length, _ = tokens.shape
        grid = (length,) if grid is None else tuple(grid)
        k, inner, rank, n = len(self.orders), self.d_inner, self.dt_rank, self.d_state
        ops = scan_ops(tokens.device, self.backend)

        x, z = self.in_proj(tokens).chunk(2, dim=-1)
        u = ops.conv_in_orders(x, grid, self.orders, self.conv1d.weight, self.conv1d.bias)  # (B, K*inner, L)

        # Per order k, x_proj_k @ u_k and dt_proj_k @ dt_low_k as matmuls batched over (batch, k): their results
        # come out (batch, k, rows, L), tokens contiguous, the scan's layout (einsum's are permuted: a copy each).
        projected = torch.matmul(self.x_proj.weight.view(k, rank + 2 * n, inner), u.view(batch, k, inner, length))
        dt_low, B, C = projected.split([rank, n, n], dim=2)
        dt = torch.matmul(self.dt_proj.weight.view(k, inner, rank), dt_low)
        y = ops.selective_scan(
            u, dt.reshape(batch, k * inner, length), -torch.exp(self.A_log.float()), B.contiguous(),
            C.contiguous(), self.D.float(), delta_bias=self.dt_proj.bias.float(), delta_softplus=True,
        )
        return self.out_proj(ops.sum_orders(y, grid, self.orders) * F.silu(z))

    def extra_repr(self) -> str:
        orders = ", ".join(f"{o.axes}{' reversed' if o.reverse else ''}" for o in self.orders)
        return f"d_model={self.d_model}, d_state={self.d_state}, expand={self.d_inner // self.d_model}, orders=[{orders}]"


class TokenIdentity(nn.Module):
    """What stands in for `Mamba` in the No-Mamba ablation: no parameters, the tokens unchanged.

    forward: tokens (B, L, d_model), grid (ignored) -> tokens.
    """

    def forward(self, tokens: Tensor, grid: Sequence[int] | None = None) -> Tensor:
        return tokens


def use_backend(module: nn.Module, backend: str | None) -> None:
    """Set the scan backend of every Mamba layer in `module` (None: the environment's choice, see `backends`)."""
    for layer in module.modules():
        if isinstance(layer, Mamba):
            layer.backend = None if backend is None else requested_backend(backend)
