"""Selective scan of Mamba (S6; Gu & Dao 2023, Eq. 2a/2b and Alg. 2), exact, in plain PyTorch.

For every batch element b, channel d and state n (A diagonal, B and C shared by the channels of a
group):

    h_t = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t          (h_{-1} = 0)
    y_t = sum_n C_t[n] * h_t[n] + D * u_t

The recurrence h_t = a_t * h_{t-1} + b_t is evaluated by `linear_recurrence_`, a chunked scan: every
chunk is scanned from a zero state (all chunks at once), the chunk-end states are connected by the same
recurrence one level up, and each token adds its chunk's start state times the running product of its
decays. Every factor is an exp of a non-positive number, nothing is divided, so the result equals the
token-by-token evaluation up to fp32 rounding, while Python loops over a chunk rather than every token.

For the CPU, where this scan runs: the states are laid out token-major, (L, batch, groups, channels, N), so
that a step of a loop reads and writes whole contiguous slices (in a channels-first layout every step gathered
rows of N floats), and computed in place, so that a layer's forward allocates two (L, ..., N) tensors (the decays
and the states) and its backward four: a fresh allocation of that size costs a page fault per 4 KiB on first
touch, as much as the arithmetic on it. Only the small (..., L) inputs and outputs are transposed. Timings:
BENCHMARKS.md, "The exact PyTorch scan on the CPU".

The backward pass is written out: the adjoint is the same recurrence run backwards,

    dh_t = a_{t+1} * dh_{t+1} + C_t * dy_t,

evaluated as g_t = a_t * dh_t (what token t passes back), g_t = a_t * (g_{t+1} + C_t * dy_t); the states are
recomputed from a saved start state per block of tokens, so a layer keeps O(batch * channels * L) memory between
forward and backward rather than O(... * L * N).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

CHUNK = 32
"""Tokens scanned one after another inside a chunk (all chunks in parallel)."""

BLOCK_ELEMENTS = {"cpu": 2**20, "cuda": 2**23}
"""States (batch * channels * tokens * d_state) materialised at once, per device type; longer inputs go block by
block. On the CPU 4 MiB of fp32: a block's tensors stay in the caches and in memory that malloc hands out again,
where 32 MiB blocks took twice as long at the brain task's Mamba stages (BENCHMARKS.md, "The exact PyTorch scan
on the CPU"); on a GPU larger blocks mean fewer kernel launches."""


def linear_recurrence_(a: Tensor, b: Tensor, h0: Tensor | None, reverse: bool = False) -> Tensor:
    """Overwrites b with all states of h_t = a_t * h_{t-1} + b_t, h_{-1} = h0, along dimension 0 (with `reverse`,
    h_t = a_t * h_{t+1} + b_t, h_L = h0); returns b. h0 None: zero.

    a, b: (L, ...); h0: (...). Exact for 0 <= a <= 1. In place: a scan allocates no (L, ...) tensor of its own.
    """
    length = a.shape[0]
    chunked = length // CHUNK * CHUNK
    if chunked < 2 * CHUNK:
        return _sequential_(a, b, h0, reverse)
    # the first `chunked` tokens in scan order by chunks, the rest token by token from their last state
    head, tail = (slice(length - chunked, length), slice(0, length - chunked)) if reverse else \
        (slice(0, chunked), slice(chunked, length))
    _chunked_(a[head], b[head], h0, reverse)
    if length > chunked:
        _sequential_(a[tail], b[tail], b[head][0 if reverse else -1], reverse)
    return b


def _chunked_(a: Tensor, b: Tensor, h0: Tensor | None, reverse: bool) -> None:
    """linear_recurrence_ of a multiple of CHUNK tokens: every chunk scanned from a zero state (all chunks at once),
    the chunk ends connected by the recurrence one level up (the decay: the chunk's product of a), then every other
    token adds its chunk's start state times the running product of the chunk's decays up to it."""
    a, b = a.unflatten(0, (-1, CHUNK)), b.unflatten(0, (-1, CHUNK))
    _sequential_(a, b, None, reverse, dim=1)
    last = 0 if reverse else CHUNK - 1
    ends = linear_recurrence_(torch.prod(a, dim=1), b[:, last], h0, reverse)  # the chunks' true last states
    start = torch.zeros_like(ends[:1]) if h0 is None else h0.unsqueeze(0)
    carry = torch.cat([ends[1:], start] if reverse else [start, ends[:-1]])
    for t in reversed(range(1, CHUNK)) if reverse else range(CHUNK - 1):
        b[:, t].add_(carry.mul_(a[:, t]))  # not `b[:, t] += ...`: Python would copy the slice back


def _sequential_(a: Tensor, b: Tensor, h0: Tensor | None, reverse: bool, dim: int = 0) -> Tensor:
    """linear_recurrence_ token by token along `dim`."""
    steps = range(a.shape[dim])
    state = h0
    for t in reversed(steps) if reverse else steps:
        state = b.select(dim, t) if state is None else b.select(dim, t).addcmul_(a.select(dim, t), state)
    return b


def _blocks(length: int, per_token: int, device: torch.device) -> list[tuple[int, int]]:
    """Token ranges [start, end) whose states (per_token = batch * channels * d_state each) fit in the device's
    BLOCK_ELEMENTS (at least one token)."""
    size = max(1, BLOCK_ELEMENTS.get(device.type, BLOCK_ELEMENTS["cuda"]) // per_token)
    return [(s, min(s + size, length)) for s in range(0, length, size)]


def _decays_and_states(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, h0: Tensor) -> tuple[Tensor, Tensor]:
    """a_t = exp(delta_t A) and h_t for one block. u, delta: (l, b, g, d); A: (g, d, n); B: (l, b, g, n)."""
    decay = torch.mul(delta.unsqueeze(-1), A).exp_()
    drive = (delta * u).unsqueeze(-1) * B.unsqueeze(-2)  # delta_t B_t u_t, scanned into the states in place
    return decay, linear_recurrence_(decay, drive, h0)


def _sum_over_states(states: Tensor, C: Tensor) -> Tensor:
    """sum_n states[..., n] * C[..., n]: states (l, b, g, d, n), C (l, b, g, n) -> (l, b, g, d)."""
    return torch.matmul(states, C.unsqueeze(-1)).squeeze(-1)


def _sum_over_channels(x: Tensor, states: Tensor) -> Tensor:
    """sum_d x[..., d] * states[..., d, :]: x (l, b, g, d), states (l, b, g, d, n) -> (l, b, g, n)."""
    return torch.matmul(x.unsqueeze(-2), states).squeeze(-2)


class _SelectiveScan(torch.autograd.Function):
    """y_t = sum_n C_t[n] h_t[n], token-major: fp32 u, delta: (l, b, g, d), A: (g, d, n), B, C: (l, b, g, n)."""

    @staticmethod
    def forward(ctx, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor) -> Tensor:
        y = torch.empty_like(u)
        h = u.new_zeros(*u.shape[1:], A.shape[-1])
        starts = []
        for s, e in _blocks(u.shape[0], h.numel(), u.device):
            starts.append(h)
            _, states = _decays_and_states(u[s:e], delta[s:e], A, B[s:e], h)
            y[s:e] = _sum_over_states(states, C[s:e])
            h = states[-1].clone()  # not a view: it would keep the block's states alive until the backward
        ctx.save_for_backward(u, delta, A, B, C, *starts)
        return y

    @staticmethod
    def backward(ctx, dy: Tensor) -> tuple[Tensor, ...]:
        """g_t = a_t * dh_t by the recurrence run backwards (module docstring); then dh_t = C_t dy_t + g_{t+1} and
        d(delta_t A) = g_t * h_{t-1} give every gradient."""
        u, delta, A, B, C, *starts = ctx.saved_tensors
        dy = dy.contiguous()  # arrives as a view of the (batch, dim, L) gradient; (L, ...) products follow its layout
        du, ddelta, dB, dC = (torch.empty_like(t) for t in (u, delta, B, C))
        dA = torch.zeros_like(A)
        carry = torch.zeros_like(starts[0])  # g at the first token of the block after this one
        for (s, e), h0 in reversed(list(zip(_blocks(u.shape[0], starts[0].numel(), u.device), starts))):
            u_, delta_, B_, dy_ = u[s:e], delta[s:e], B[s:e], dy[s:e]
            decay, states = _decays_and_states(u_, delta_, A, B_, h0)
            dh = dy_.unsqueeze(-1) * C[s:e].unsqueeze(-2)  # C_t dy_t, then dh_t
            g = linear_recurrence_(decay, decay * dh, carry, reverse=True)
            dh[:-1].add_(g[1:])
            dh[-1].add_(carry)
            carry = g[0].clone()
            g[1:].mul_(states[:-1])  # g becomes d(delta_t A)
            g[0].mul_(h0)
            dh_B = _sum_over_states(dh, B_)
            du[s:e] = dh_B * delta_
            ddelta[s:e] = torch.addcmul(torch.mul(g, A, out=decay).sum(-1), dh_B, u_)  # decay's memory reused
            dA += torch.mul(g, delta_.unsqueeze(-1), out=decay).sum((0, 1))
            dB[s:e] = _sum_over_channels(delta_ * u_, dh)
            dC[s:e] = _sum_over_channels(dy_, states)
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

        def token_major(x: Tensor) -> Tensor:  # (batch, groups, channels, L) -> (L, batch, groups, channels)
            return x.reshape(batch, groups, -1, length).permute(3, 0, 1, 2).contiguous()

        y = _SelectiveScan.apply(token_major(u32), token_major(delta),
                                 A.float().reshape(groups, dim // groups, d_state), token_major(B.float()),
                                 token_major(C.float()))
        y = y.permute(1, 2, 3, 0).reshape(batch, dim, length)
        if D is not None:
            y = torch.addcmul(y, D.float().unsqueeze(-1), u32)
        if z is not None:
            y = y * F.silu(z.float())
        return y.to(u.dtype)
