"""Selective scan of Mamba (S6; Gu & Dao 2023, Eq. 2a/2b and Alg. 2), exact, in plain PyTorch.

For every batch element b, channel d and state n (A diagonal, B and C shared by the channels of a
group):

    h_t = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t          (h_{-1} = 0)
    y_t = sum_n C_t[n] * h_t[n] + D * u_t

The recurrence h_t = a_t * h_{t-1} + b_t is evaluated by `linear_recurrence`, a chunked scan: every
chunk is scanned from a zero state (all chunks at once), the chunk-end states are connected by the same
recurrence one level up, and each token adds its chunk's start state times the running product of its
decays. Every factor is an exp of a non-positive number, nothing is divided, so the result equals the
token-by-token evaluation up to fp32 rounding, while Python loops over a chunk rather than every token.

The backward pass is written out: the adjoint is the same recurrence run backwards,

    dh_t = a_{t+1} * dh_{t+1} + C_t * dy_t,

and the states are recomputed from a saved start state per block of tokens, so a layer keeps
O(batch * channels * L) memory between forward and backward rather than O(... * L * N).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

CHUNK = 32
"""Tokens scanned one after another inside a chunk (all chunks in parallel)."""

BLOCK_ELEMENTS = 2**23
"""States (batch * channels * tokens * d_state) materialised at once; longer inputs go block by block."""


def linear_recurrence(a: Tensor, b: Tensor, h0: Tensor) -> Tensor:
    """All states of h_t = a_t * h_{t-1} + b_t, h_{-1} = h0, along dimension -2.

    a, b: (..., L, N); h0: (..., N). Returns h: (..., L, N). Exact for 0 <= a <= 1.
    """
    length = a.shape[-2]
    if length <= CHUNK:
        return _sequential(a, b, h0)
    n_chunks = -(-length // CHUNK)
    pad = n_chunks * CHUNK - length
    if pad:
        a = F.pad(a, (0, 0, 0, pad), value=1.0)
        b = F.pad(b, (0, 0, 0, pad))
    a = a.unflatten(-2, (n_chunks, CHUNK))
    b = b.unflatten(-2, (n_chunks, CHUNK))
    local = _sequential(a, b, torch.zeros_like(b[..., 0, :]))
    decay = torch.cumprod(a, dim=-2)
    ends = linear_recurrence(decay[..., -1, :], local[..., -1, :], h0)
    starts = torch.cat([h0.unsqueeze(-2), ends[..., :-1, :]], dim=-2)
    h = torch.addcmul(local, decay, starts.unsqueeze(-2))
    return h.flatten(-3, -2)[..., :length, :]


def _sequential(a: Tensor, b: Tensor, h0: Tensor) -> Tensor:
    states, state = [], h0
    for t in range(a.shape[-2]):
        state = torch.addcmul(b[..., t, :], a[..., t, :], state)
        states.append(state)
    return torch.stack(states, dim=-2)  # one copy; writing each step into a strided slice is ~10x slower


def _blocks(shape: torch.Size, d_state: int) -> list[tuple[int, int]]:
    """Token ranges [start, end) whose states fit in BLOCK_ELEMENTS (a multiple of CHUNK long)."""
    batch, groups, channels, length = shape
    per_token = batch * groups * channels * d_state
    size = max(CHUNK, BLOCK_ELEMENTS // per_token // CHUNK * CHUNK)
    return [(s, min(s + size, length)) for s in range(0, length, size)]


def _decays_and_states(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, h0: Tensor) -> tuple[Tensor, Tensor]:
    """a_t = exp(delta_t A) and h_t for one block. u, delta: (b, g, d, l); A: (g, d, n); B: (b, g, n, l)."""
    decay = torch.exp(delta.unsqueeze(-1) * A.unsqueeze(-2))
    drive = (delta * u).unsqueeze(-1) * B.transpose(-1, -2).unsqueeze(2)
    return decay, linear_recurrence(decay, drive, h0)


class _SelectiveScan(torch.autograd.Function):
    """y_t = sum_n C_t[n] h_t[n] for fp32 u, delta: (b, g, d, l), A: (g, d, n), B, C: (b, g, n, l)."""

    @staticmethod
    def forward(ctx, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor) -> Tensor:
        y = torch.empty_like(u)
        h = u.new_zeros(*u.shape[:3], A.shape[-1])
        starts = []
        for s, e in _blocks(u.shape, A.shape[-1]):
            starts.append(h)
            _, states = _decays_and_states(u[..., s:e], delta[..., s:e], A, B[..., s:e], h)
            y[..., s:e] = (states * C[..., s:e].transpose(-1, -2).unsqueeze(2)).sum(-1)
            h = states[..., -1, :]
        ctx.save_for_backward(u, delta, A, B, C, *starts)
        return y

    @staticmethod
    def backward(ctx, dy: Tensor) -> tuple[Tensor, ...]:
        u, delta, A, B, C, *starts = ctx.saved_tensors
        du, ddelta, dB, dC = (torch.empty_like(t) for t in (u, delta, B, C))
        dA = torch.zeros_like(A)
        carry = torch.zeros_like(starts[0])  # a_{t+1} * dh_{t+1} at the block's last token
        for (s, e), h0 in reversed(list(zip(_blocks(u.shape, A.shape[-1]), starts))):
            u_, delta_, B_t = u[..., s:e], delta[..., s:e], B[..., s:e].transpose(-1, -2).unsqueeze(2)
            decay, states = _decays_and_states(u_, delta_, A, B[..., s:e], h0)
            direct = dy[..., s:e].unsqueeze(-1) * C[..., s:e].transpose(-1, -2).unsqueeze(2)
            next_decay = torch.cat([decay[..., 1:, :], torch.ones_like(decay[..., :1, :])], dim=-2)
            dh = linear_recurrence(next_decay.flip(-2), direct.flip(-2), carry).flip(-2)
            previous = torch.cat([h0.unsqueeze(-2), states[..., :-1, :]], dim=-2)
            d_exponent = dh * previous * decay  # gradient w.r.t. delta_t * A
            dh_B = (dh * B_t).sum(-1)
            ddelta[..., s:e] = (d_exponent * A.unsqueeze(-2)).sum(-1) + dh_B * u_
            du[..., s:e] = dh_B * delta_
            dA += (d_exponent * delta_.unsqueeze(-1)).sum((0, 3))
            dB[..., s:e] = (dh * (delta_ * u_).unsqueeze(-1)).sum(2).transpose(-1, -2)
            dC[..., s:e] = (states * dy[..., s:e].unsqueeze(-1)).sum(2).transpose(-1, -2)
            carry = decay[..., 0, :] * dh[..., 0, :]
        return du, ddelta, dA, dB, dC


def selective_scan(
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
    """Same contract as mamba_ssm's `selective_scan_fn` (variable B and C), computed in fp32.

    u, delta, z: (batch, dim, L); A: (dim, N); B, C: (batch, N, L) or (batch, groups, N, L), the
    channels split evenly into the groups; D, delta_bias: (dim,).
    Returns y * silu(z) (or y): (batch, dim, L) in u's dtype.
    """
    with torch.autocast(u.device.type, enabled=False):
        batch, dim, length = u.shape
        B = B.unsqueeze(1) if B.dim() == 3 else B
        C = C.unsqueeze(1) if C.dim() == 3 else C
        groups, d_state = B.shape[1], A.shape[-1]
        u32 = u.float()
        delta = delta.float()
        if delta_bias is not None:
            delta = delta + delta_bias.float().unsqueeze(-1)
        if delta_softplus:
            delta = F.softplus(delta)
        grouped = (batch, groups, dim // groups, length)
        y = _SelectiveScan.apply(
            u32.reshape(grouped), delta.reshape(grouped), A.float().reshape(groups, dim // groups, d_state),
            B.float(), C.float(),
        ).reshape(batch, dim, length)
        if D is not None:
            y = torch.addcmul(y, D.float().unsqueeze(-1), u32)
        if z is not None:
            y = y * F.silu(z.float())
        return y.to(u.dtype)
