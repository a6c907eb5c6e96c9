"""What the Triton scan's forward and backward kernels share: tuning constants, the program layout and the
tile steps (`triton_scan.py` states the recurrence).

Every kernel runs one program (one warp) per (batch, group, block of BLOCK_D channels of the group, segment of
the sequence): the channels lie across the warp's lanes (two lanes per channel at BLOCK_D 16, splitting its
states), the states and a tile of TILE consecutive tokens in each lane's registers. u, delta, z, out are
(TILE, BLOCK_D) tiles, B and C (TILE, BLOCK_N), and the steps

    a_t = exp(delta_t * A),   b_t = delta_t * u_t * B_t          (TILE, BLOCK_N, BLOCK_D) tiles

are composed by `tl.associative_scan` along the token axis, inside each lane (no data crosses lanes). The step
h -> a h + b composes as

    (a1, b1) then (a2, b2) = (a1 * a2, a2 * b1 + b2),

so the inclusive scan from the tile's first token gives the running product P_t = a_first ... a_t and the
state reached from zero, H_t; with the carried start state h0, h_t = H_t + P_t * h0. Tokens past L are identity
steps (a = 1, b = 0), so the last row is the state after the tile: the next tile's start. y_t sums over the
states, in each lane and then across the channel's two lanes.
"""

from __future__ import annotations

import triton
import triton.language as tl

TILE = 2
"""Tokens in each lane's registers at once (a power of two). Measured on an H200 (BENCHMARKS.md, "Triton scan launch
settings"): 2 beats 1 and 4 at one warp per program."""

TILES = 16
"""Tiles per block: the forward saves the state before every block of TILE * TILES tokens for the backward
((batch, dim, L / 32, N) fp32, half the size of u in fp32 at d_state 16; 8 tiles ran as fast, at twice that)."""

BLOCK_D = 16
"""Most channels per program (a power of two): across its warp's lanes, two lanes per channel splitting the
states (8 and 32 were slower)."""

NUM_WARPS = 1
"""Warps per program."""

PROGRAMS_PER_SM = 16
"""Programs per SM below which the sequence is split into segments scanned in parallel (`_segment_blocks`);
8 and 32 measured within noise, 64 slower."""

MIN_SEGMENT_BLOCKS = 2
"""Fewest blocks in a segment."""


@triton.jit
def _softplus(x):
    """softplus(x) = log(1 + exp(x)) (x itself above 20, as in PyTorch).

    log1p(e) as log(1 + e) * e / ((1 + e) - 1), exact for tiny e (libdevice's log1p: not in the interpreter).
    """
    e = tl.exp(tl.minimum(x, 20.0))
    w = 1.0 + e
    log1p = tl.where(w == 1.0, e, tl.log(w) * e / tl.where(w == 1.0, 1.0, w - 1.0))
    return tl.where(x > 20.0, x, log1p)


@triton.jit
def _compose(a1, b1, a2, b2):
    """The step h -> a1 h + b1 followed by h -> a2 h + b2: h -> (a1 a2) h + (a2 b1 + b2)."""
    return a1 * a2, a2 * b1 + b2


@triton.jit
def _program_tiles(A, D, bias, dim, groups, per_group, d_state,
                   HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    """This program's batch element b, group g, channel block, channels d (BLOCK_D,), states n (BLOCK_N,),
    their masks, A (BLOCK_N, BLOCK_D), D and delta_bias (BLOCK_D,) (zeros when absent), fp32."""
    b = tl.program_id(0) // groups
    g = tl.program_id(0) % groups
    block = tl.program_id(1)
    local = block * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = local < per_group
    d = g * per_group + local
    n = tl.arange(0, BLOCK_N)
    n_mask = n < d_state
    nd_mask = n_mask[:, None] & d_mask[None, :]
    A_tile = tl.load(A + d[None, :] * d_state + n[:, None], mask=nd_mask, other=0.0).to(tl.float32)
    D_vec = tl.zeros((BLOCK_D,), tl.float32)
    if HAS_D:
        D_vec += tl.load(D + d, mask=d_mask, other=0.0).to(tl.float32)
    bias_vec = tl.zeros((BLOCK_D,), tl.float32)
    if HAS_BIAS:
        bias_vec += tl.load(bias + d, mask=d_mask, other=0.0).to(tl.float32)
    return b, g, block, d, n, d_mask, n_mask, nd_mask, A_tile, D_vec, bias_vec


@triton.jit
def _load_tile(ptr, tokens, token_stride, valid, rows, row_mask):
    """fp32 tile (T, R) of tokens (T,) and rows (R,) (row offsets: channels or states); 0 where a mask is false."""
    mask = valid[:, None] & row_mask[None, :]
    return tl.load(ptr + tokens[:, None] * token_stride + rows[None, :], mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _store_tile(ptr, tokens, token_stride, valid, rows, row_mask, value):
    """Store value (T, R) at tokens (T,) and rows (R,) where both masks hold."""
    tl.store(ptr + tokens[:, None] * token_stride + rows[None, :], value, mask=valid[:, None] & row_mask[None, :])


@triton.jit
def _add_tile(ptr, tokens, token_stride, valid, rows, row_mask, value):
    """Add value (T, R) atomically at tokens (T,) and rows (R,) where both masks hold."""
    tl.atomic_add(ptr + tokens[:, None] * token_stride + rows[None, :], value,
                  mask=valid[:, None] & row_mask[None, :], sem="relaxed")


@triton.jit
def _delta_tile(delta, tokens, token_stride, valid, channels, d_mask, bias_vec, SOFTPLUS: tl.constexpr):
    """delta_t (T, BLOCK_D) after bias and softplus, 0 at invalid tokens (an identity step there), and
    raw = delta + bias before the softplus."""
    raw = _load_tile(delta, tokens, token_stride, valid, channels, d_mask) + bias_vec[None, :]
    dt = _softplus(raw) if SOFTPLUS else raw
    return tl.where(valid[:, None], dt, 0.0), raw


@triton.jit
def _decay(dt, A_tile):
    """a_t = exp(delta_t A): (T, BLOCK_N, BLOCK_D) from delta (T, BLOCK_D) and A (BLOCK_N, BLOCK_D)."""
    return tl.exp(dt[:, None, :] * A_tile[None, :, :])


@triton.jit
def _drive(dt, u_t, B_t):
    """b_t = delta_t u_t B_t: (T, BLOCK_N, BLOCK_D) from delta, u (T, BLOCK_D) and B (T, BLOCK_N)."""
    return (dt * u_t)[:, None, :] * B_t[:, :, None]


@triton.jit
def _states(a, b, h0):
    """h_t = a_t h_{t-1} + b_t for every t of the first axis, h_{-1} = h0 (BLOCK_N, BLOCK_D): the scan of the
    steps from zero, H_t with the running product P_t, plus P_t h0. a, b, result: (T, BLOCK_N, BLOCK_D)."""
    decay, local = tl.associative_scan((a, b), 0, _compose)
    return local + decay * h0[None, :, :]


@triton.jit
def _reverse_scan(a, b):
    """The steps (a_t, b_t) composed from the last token back to each t: (Q_t, K_t) with Q_t = a_t ... a_last.
    A forward scan between two flips: `associative_scan(reverse=True)` moves data across lanes even along
    an axis inside each lane (Triton 3.8), a flip of that axis does not."""
    decay, local = tl.associative_scan((tl.flip(a, 0), tl.flip(b, 0)), 0, _compose)
    return tl.flip(decay, 0), tl.flip(local, 0)


@triton.jit
def _row(x, index, T: tl.constexpr):
    """x[index] of a (T, BLOCK_N, BLOCK_D) tile (the first axis lies in each lane's registers: no data moves)."""
    return tl.sum(tl.where((tl.arange(0, T) == index)[:, None, None], x, 0.0), axis=0)


@triton.jit
def _shift_up(x, T: tl.constexpr):
    """y[t] = x[t + 1] for t < T - 1 and y[T - 1] = 1 of a (T, BLOCK_N, BLOCK_D) tile (in each lane's registers):
    a_{t+1} from a_t within a tile, the tile's last token taking a = 1."""
    rows = tl.arange(0, T)[:, None, None]
    shifted = tl.where(rows == T - 1, 1.0, x)
    for k in tl.static_range(T - 1):
        shifted = tl.where(rows == k, _row(x, k + 1, T)[None, :, :], shifted)
    return shifted


@triton.jit
def _segment(n_blocks, seg_blocks):
    """This program's segment: its index and its checkpoint blocks [first, last)."""
    seg = tl.program_id(2)
    first = seg * seg_blocks
    return seg, first, tl.minimum(first + seg_blocks, n_blocks)
