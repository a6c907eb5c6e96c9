"""Selective scan of Mamba (S6) as Triton kernels, same contract as `scan.selective_scan`.

For every batch element b, channel d and state n (B and C shared by the channels of a group):

    delta_t = softplus(delta_t + delta_bias)               (bias and softplus optional)
    h_t = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t   (h_{-1} = 0)
    y_t = sum_n C_t[n] * h_t[n] + D * u_t
    out_t = y_t * silu(z_t)                                 (z optional)

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

The (batch, dim, L) tensors may have either layout of their last two axes: channels contiguous ("token-major",
(batch, L, dim) in memory: a token's BLOCK_D channels are one contiguous load) or tokens contiguous; B and C
take the same layout. The strides are kernel arguments.

Segments make long sequences parallel (one walk over L tokens per channel block leaves most SMs idle
at L = 32768). A segment's start state is linear in the previous one: h_end = exp(A * S) h_start + H, with S
the sum of the segment's deltas and H the state it reaches from zero. So the forward runs three launches: the
kernel in SUMMARY mode (H and S of every segment, in parallel), `_carry_kernel` (the short sequential
recurrence over segments, giving their start states), and the kernel again from those starts. One segment
(short sequences, or channel blocks enough to fill the GPU) needs only the last launch. The forward writes the
state before every block of TILES tiles to `starts` (batch, dim, ceil(L / (TILE * TILES)), N), fp32: all that the
backward keeps besides the inputs (and S), never O(L * N).

Backward: the same grid walks each segment's blocks from last to first. From the block's saved start state it
recomputes the state before each of its tiles (into `scratch`, the program's own (TILES, BLOCK_N, BLOCK_D)
fp32, read back soon after: L1/L2), then walks the tiles from last to first: the tile's states h_t from its
start, and a_t h_{t-1} = h_t - b_t. The adjoint runs backwards,

    dy_t = dout_t * silu(z_t)                          dz_t = dout_t * y_t * silu'(z_t)
    dh_t = a_{t+1} * dh_{t+1} + C_t * dy_t,

the same step composition scanned from the tile's last token back (`_reverse_scan`) over (a_{t+1}, C_t dy_t),
where the tile's last token takes a = 1 and the carry a_{t+1} dh_{t+1} from the later tile is added as
dh_t += Q_t * carry (Q_t = a_{t+1} ... a_last). Between segments the carry follows the same kind of recurrence,
carry_in = exp(A * S) carry_out + K (K: the carry a segment passes on from a zero carry), so with several segments
a SUMMARY pass (K only: no states) and `_carry_kernel` in reverse come first, as in the forward. Then per token

    g_t = dh_t * exp(delta_t A) * h_{t-1}              (gradient of the exponent delta_t * A)
    du_t = delta_t * sum_n dh_t B_t + D * dy_t
    ddelta_t = (sum_n g_t A + u_t * sum_n dh_t B_t) * sigmoid(delta_t + delta_bias)   (sigmoid if softplus)
    dA = sum_{b,t} g_t delta_t     dB_t = sum_{d in group} dh_t delta_t u_t     dC_t = sum_{d in group} h_t dy_t
    dD = sum_{b,t} dy_t u_t        d(delta_bias) = sum_{b,t} ddelta_t

Gradients shared across programs: dA, dD and d(delta_bias) are written per (b, segment, d) as fp32 partial sums
and summed in PyTorch (deterministic). dB and dC sum over the channels of a group: each program sums its
BLOCK_D channels across the lanes and adds the (TILE, N) result atomically into one fp32 (batch, groups, N, L)
tensor; the order of the atomic adds varies, so dB and dC vary in the last bits from run to run, as mamba-ssm's do.
All arithmetic is fp32; inputs may be fp32, bf16 or fp16 and every output or gradient has its input's dtype.

On a machine without a GPU the kernels run under Triton's interpreter (TRITON_INTERPRET=1 set before
triton is imported), which takes CPU tensors as they are.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl
from torch import Tensor

TILE = 2
"""Tokens in each lane's registers at once (a power of two). Measured on an H200 (BENCHMARKS.md, session 9):
2 beats 1 and 4 at one warp per program."""

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
def _segment(n_blocks, seg_blocks):
    """This program's segment: its index and its checkpoint blocks [first, last)."""
    seg = tl.program_id(2)
    first = seg * seg_blocks
    return seg, first, tl.minimum(first + seg_blocks, n_blocks)


@triton.jit
def _forward_kernel(
    u, delta, A, B, C, D, z, bias, out, starts, seg_state, seg_dt,
    dim, groups, per_group, length, d_state, n_blocks, seg_blocks,
    channel_stride, token_stride, state_stride, bc_token_stride,
    SUMMARY: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr, TILE: tl.constexpr, TILES: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One channel block over one segment of checkpoint blocks (TILES tiles of TILE tokens each). SUMMARY: the
    state the segment reaches from h = 0 into seg_state (batch, dim, n_segments, N) and the sum of its deltas
    into seg_dt (batch, dim, n_segments). Otherwise, from the segment's start state in seg_state: out, and the
    state before every block into starts (batch, dim, n_blocks, N)."""
    b, g, block, d, n, d_mask, n_mask, nd_mask, A_tile, D_vec, bias_vec = _program_tiles(
        A, D, bias, dim, groups, per_group, d_state, HAS_D, HAS_BIAS, BLOCK_D, BLOCK_N)
    seg, first, last = _segment(n_blocks, seg_blocks)
    x_base = b.to(tl.int64) * dim * length  # u, delta, z, out: (batch, dim, L) in any layout of the last two axes
    channels = d * channel_stride
    bc_base = (b * groups + g).to(tl.int64) * d_state * length
    states = n * state_stride
    start_tiles = ((b * dim + d).to(tl.int64) * n_blocks * d_state)[None, :] + n[:, None]
    seg_rows = (b * dim + d).to(tl.int64) * tl.num_programs(2) + seg
    seg_tiles = (seg_rows * d_state)[None, :] + n[:, None]
    h = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    if not SUMMARY:
        h += tl.load(seg_state + seg_tiles, mask=nd_mask, other=0.0)
    dt_sum = tl.zeros((BLOCK_D,), tl.float32)
    for c in range(first, last):
        if not SUMMARY:
            tl.store(starts + start_tiles + c * d_state, h, mask=nd_mask)
        for i in range(TILES):
            tokens = (c * TILES + i) * TILE + tl.arange(0, TILE)
            valid = tokens < length
            dt, _ = _delta_tile(delta + x_base, tokens, token_stride, valid, channels, d_mask, bias_vec, SOFTPLUS)
            u_t = _load_tile(u + x_base, tokens, token_stride, valid, channels, d_mask)
            B_t = _load_tile(B + bc_base, tokens, bc_token_stride, valid, states, n_mask)
            hs = _states(_decay(dt, A_tile), _drive(dt, u_t, B_t), h)
            if SUMMARY:
                dt_sum += tl.sum(dt, axis=0)
            else:
                C_t = _load_tile(C + bc_base, tokens, bc_token_stride, valid, states, n_mask)
                y = tl.sum(hs * C_t[:, :, None], axis=1) + D_vec[None, :] * u_t
                if HAS_Z:
                    z_t = _load_tile(z + x_base, tokens, token_stride, valid, channels, d_mask)
                    y = y * z_t * tl.sigmoid(z_t)
                _store_tile(out + x_base, tokens, token_stride, valid, channels, d_mask, y)
            h = _row(hs, TILE - 1, TILE)  # tail tokens are identity steps: the state after token L - 1
    if SUMMARY:
        tl.store(seg_state + seg_tiles, h, mask=nd_mask)
        tl.store(seg_dt + seg_rows, dt_sum, mask=d_mask)


@triton.jit
def _carry_kernel(
    seg_state, seg_dt, A, dim, d_state, n_segments,
    REVERSE: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Replaces what every segment contributes from a zero carry, seg_state (batch, dim, n_segments, N), by the
    carry it starts from, walking the segments in order (forward: start states) or reversed (backward: the
    adjoint carried in from later tokens): carry_next = exp(A * seg_dt_s) * carry_s + seg_state_s, from 0."""
    b = tl.program_id(0)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    n = tl.arange(0, BLOCK_N)
    d_mask = d < dim
    nd_mask = (n < d_state)[:, None] & d_mask[None, :]
    A_tile = tl.load(A + d[None, :] * d_state + n[:, None], mask=nd_mask, other=0.0).to(tl.float32)
    seg_rows = (b * dim + d).to(tl.int64) * n_segments
    carry = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    for i in range(0, n_segments):
        if REVERSE:
            s = n_segments - 1 - i
        else:
            s = i
        tiles = ((seg_rows + s) * d_state)[None, :] + n[:, None]
        own = tl.load(seg_state + tiles, mask=nd_mask, other=0.0)
        tl.store(seg_state + tiles, carry, mask=nd_mask)
        carry = tl.exp(tl.load(seg_dt + seg_rows + s, mask=d_mask, other=0.0)[None, :] * A_tile) * carry + own


@triton.jit
def _backward_kernel(
    u, delta, A, B, C, D, z, bias, dout, starts, seg_carry, scratch,
    du, ddelta, dz, dA_part, dB_sum, dC_sum, dD_part, dbias_part,
    dim, groups, per_group, length, d_state, n_blocks, seg_blocks,
    channel_stride, token_stride, state_stride, bc_token_stride,
    SUMMARY: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr, TILE: tl.constexpr, TILES: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One channel block over one segment of checkpoint blocks, last block first, its tiles last first.
    SUMMARY: the adjoint carry the segment passes to earlier tokens from a zero carry, into seg_carry (batch,
    dim, n_segments, N). Otherwise, from the carry in seg_carry: du, ddelta, dz; partial sums dA (batch,
    n_segments, dim, N), dD and dbias (batch, n_segments, dim); dB, dC added into fp32 (batch, groups, N, L)
    (B's layout). scratch: this program's tile start states, (TILES, BLOCK_N, BLOCK_D) per program."""
    b, g, block, d, n, d_mask, n_mask, nd_mask, A_tile, D_vec, bias_vec = _program_tiles(
        A, D, bias, dim, groups, per_group, d_state, HAS_D, HAS_BIAS, BLOCK_D, BLOCK_N)
    seg, first, last = _segment(n_blocks, seg_blocks)
    x_base = b.to(tl.int64) * dim * length
    channels = d * channel_stride
    bc_base = (b * groups + g).to(tl.int64) * d_state * length
    states = n * state_stride
    start_tiles = ((b * dim + d).to(tl.int64) * n_blocks * d_state)[None, :] + n[:, None]
    seg_tiles = (((b * dim + d).to(tl.int64) * tl.num_programs(2) + seg) * d_state)[None, :] + n[:, None]
    program = (tl.program_id(0) * tl.num_programs(1) + block) * tl.num_programs(2) + seg
    scratch_tiles = (program.to(tl.int64) * TILES * BLOCK_N * BLOCK_D + (n * BLOCK_D)[:, None]
                     + tl.arange(0, BLOCK_D)[None, :])
    rows = tl.arange(0, TILE)
    carry = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)  # a_{t+1} * dh_{t+1} after the tile's last token
    if not SUMMARY:
        carry += tl.load(seg_carry + seg_tiles, mask=nd_mask, other=0.0)
    dA_acc = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    dD_acc = tl.zeros((BLOCK_D,), tl.float32)
    dbias_acc = tl.zeros((BLOCK_D,), tl.float32)
    for i in range(0, last - first):
        c = last - 1 - i
        if not SUMMARY:  # the state before each tile of the block, from the block's saved start
            h = tl.load(starts + start_tiles + c * d_state, mask=nd_mask, other=0.0)
            for k in range(TILES):
                tl.store(scratch + scratch_tiles + k * BLOCK_N * BLOCK_D, h)
                if k < TILES - 1:
                    tokens = (c * TILES + k) * TILE + rows
                    valid = tokens < length
                    dt, _ = _delta_tile(delta + x_base, tokens, token_stride, valid, channels, d_mask, bias_vec,
                                        SOFTPLUS)
                    u_t = _load_tile(u + x_base, tokens, token_stride, valid, channels, d_mask)
                    B_t = _load_tile(B + bc_base, tokens, bc_token_stride, valid, states, n_mask)
                    h = _row(_states(_decay(dt, A_tile), _drive(dt, u_t, B_t), h), TILE - 1, TILE)
            tl.debug_barrier()  # scratch is read below in the layout Triton picks: other lanes, if it differs
        for j in range(TILES):
            k = TILES - 1 - j
            tokens = (c * TILES + k) * TILE + rows
            valid = tokens < length
            dt, raw = _delta_tile(delta + x_base, tokens, token_stride, valid, channels, d_mask, bias_vec, SOFTPLUS)
            C_t = _load_tile(C + bc_base, tokens, bc_token_stride, valid, states, n_mask)
            dout_t = _load_tile(dout + x_base, tokens, token_stride, valid, channels, d_mask)
            dy = dout_t
            if HAS_Z:
                z_t = _load_tile(z + x_base, tokens, token_stride, valid, channels, d_mask)
                sig = tl.sigmoid(z_t)
                dy = dout_t * z_t * sig
            # adjoint dh_t = a_{t+1} dh_{t+1} + C_t dy_t: a reverse scan over (a_{t+1}, C_t dy_t), the tile's last
            # token taking a = 1, plus the carry from later tiles.
            after, after_valid = tokens + 1, (rows < TILE - 1) & (tokens + 1 < length)
            dt_after, _ = _delta_tile(delta + x_base, after, token_stride, after_valid, channels, d_mask, bias_vec,
                                      SOFTPLUS)
            suffix_decay, suffix = _reverse_scan(_decay(dt_after, A_tile), dy[:, None, :] * C_t[:, :, None])
            dh = suffix + suffix_decay * carry[None, :, :]
            if not SUMMARY:
                u_t = _load_tile(u + x_base, tokens, token_stride, valid, channels, d_mask)
                B_t = _load_tile(B + bc_base, tokens, bc_token_stride, valid, states, n_mask)
                b_t = _drive(dt, u_t, B_t)
                hs = _states(_decay(dt, A_tile), b_t, tl.load(scratch + scratch_tiles + k * BLOCK_N * BLOCK_D))
                if HAS_Z:
                    y = tl.sum(hs * C_t[:, :, None], axis=1) + D_vec[None, :] * u_t
                    _store_tile(dz + x_base, tokens, token_stride, valid, channels, d_mask,
                                dout_t * y * sig * (1.0 + z_t * (1.0 - sig)))
                _add_tile(dC_sum + bc_base, tokens, bc_token_stride, valid, states, n_mask,
                          tl.sum(hs * dy[:, None, :], axis=2))
                d_exponent = dh * (hs - b_t)  # dh_t exp(delta_t A) h_{t-1}
                dh_B = tl.sum(dh * B_t[:, :, None], axis=1)
                d_dt = tl.sum(d_exponent * A_tile[None, :, :], axis=1) + dh_B * u_t
                if SOFTPLUS:
                    d_dt = d_dt * tl.sigmoid(raw)
                _store_tile(du + x_base, tokens, token_stride, valid, channels, d_mask,
                            dh_B * dt + D_vec[None, :] * dy)
                _store_tile(ddelta + x_base, tokens, token_stride, valid, channels, d_mask, d_dt)
                _add_tile(dB_sum + bc_base, tokens, bc_token_stride, valid, states, n_mask,
                          tl.sum(dh * (dt * u_t)[:, None, :], axis=2))
                dA_acc += tl.sum(d_exponent * dt[:, None, :], axis=0)
                dD_acc += tl.sum(dy * u_t, axis=0)
                dbias_acc += tl.sum(d_dt, axis=0)
            carry = _row(_decay(dt, A_tile), 0, TILE) * _row(dh, 0, TILE)
    if SUMMARY:
        tl.store(seg_carry + seg_tiles, carry, mask=nd_mask)
    else:
        part = (b * tl.num_programs(2) + seg) * dim + d
        tl.store(dA_part + part[None, :] * d_state + n[:, None], dA_acc, mask=nd_mask)
        tl.store(dD_part + part, dD_acc, mask=d_mask)
        tl.store(dbias_part + part, dbias_acc, mask=d_mask)


def _segment_blocks(n_blocks: int, programs: int, device: torch.device) -> int:
    """Blocks per segment: as many segments as bring the grid to PROGRAMS_PER_SM programs per SM of the GPU
    (the `programs` of one segment each take a sequential walk), each at least MIN_SEGMENT_BLOCKS long."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
    segments = max(1, min(PROGRAMS_PER_SM * sms // programs, n_blocks // MIN_SEGMENT_BLOCKS))
    return triton.cdiv(n_blocks, segments)


def _launch_config(u: Tensor, A: Tensor, B: Tensor) -> tuple[tuple[int, int, int], dict]:
    """Grid (batch * groups, channel blocks per group, segments) and the sizes every kernel takes."""
    batch, dim, length = u.shape
    groups, d_state = B.shape[1], A.shape[1]
    per_group = dim // groups
    block_d = min(BLOCK_D, triton.next_power_of_2(per_group))
    n_blocks = triton.cdiv(length, TILE * TILES)
    channel_blocks = triton.cdiv(per_group, block_d)
    seg_blocks = _segment_blocks(n_blocks, batch * groups * channel_blocks, u.device)
    grid = (batch * groups, channel_blocks, triton.cdiv(n_blocks, seg_blocks))
    sizes = dict(dim=dim, groups=groups, per_group=per_group, length=length, d_state=d_state, n_blocks=n_blocks,
                 seg_blocks=seg_blocks, TILE=TILE, TILES=TILES, BLOCK_D=block_d,
                 BLOCK_N=triton.next_power_of_2(d_state))
    return grid, sizes


def _strides(u: Tensor, B: Tensor) -> dict:
    """The kernels' strides of the (batch, dim, L) tensors' channels and tokens and of B's states and tokens."""
    return dict(channel_stride=u.stride(1), token_stride=u.stride(2), state_stride=B.stride(2),
                bc_token_stride=B.stride(3))


def _carry_between_segments(seg_state: Tensor, seg_dt: Tensor, A: Tensor, sizes: dict, reverse: bool) -> None:
    """`_carry_kernel` over seg_state in place, one program per batch element and block of channels."""
    batch, dim, n_segments, _ = seg_state.shape
    block_d = sizes["BLOCK_D"]
    _carry_kernel[(batch, triton.cdiv(dim, block_d))](seg_state, seg_dt, A, dim, sizes["d_state"], n_segments,
                                                      REVERSE=reverse, BLOCK_D=block_d, BLOCK_N=sizes["BLOCK_N"],
                                                      num_warps=NUM_WARPS)


def _on_device(t: Tensor) -> contextlib.AbstractContextManager:
    """Launch on t's GPU (Triton launches on the current device); nothing to do for CPU tensors."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _token_major(u: Tensor) -> bool:
    """Whether u (batch, dim, L) has its channels contiguous: (batch, L, dim) in memory."""
    return u.stride(1) == 1 and u.shape[1] > 1


def _in_layout(t: Tensor, token_major: bool) -> Tensor:
    """t (..., rows, L) dense with its last two axes as asked: rows contiguous (token-major) or tokens."""
    if token_major:
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    return t.contiguous()


class _TritonSelectiveScan(torch.autograd.Function):
    """u, delta, z: (batch, dim, L); A: (dim, N); B, C: (batch, groups, N, L); D, delta_bias: (dim,). The (batch,
    dim, L) tensors and B, C share one layout of their last two axes (`_in_layout`)."""

    @staticmethod
    def forward(ctx, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None,
                z: Tensor | None, delta_bias: Tensor | None, delta_softplus: bool) -> Tensor:
        grid, sizes = _launch_config(u, A, B)
        flags = dict(HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
                     SOFTPLUS=delta_softplus)
        batch, dim, _ = u.shape
        f32 = dict(dtype=torch.float32, device=u.device)
        out = torch.empty_like(u)
        starts = torch.empty(batch, dim, sizes["n_blocks"], A.shape[1], **f32)
        seg_state = torch.zeros(batch, dim, grid[2], A.shape[1], **f32)
        seg_dt = torch.zeros(batch, dim, grid[2], **f32)
        inputs = (u, delta, A, B, C, D if D is not None else u, z if z is not None else u,
                  delta_bias if delta_bias is not None else u, out, starts, seg_state, seg_dt)
        launch = dict(**sizes, **_strides(u, B), **flags, num_warps=NUM_WARPS)
        with _on_device(u):
            if grid[2] > 1:
                _forward_kernel[grid](*inputs, **launch, SUMMARY=True)
                _carry_between_segments(seg_state, seg_dt, A, sizes, reverse=False)
            _forward_kernel[grid](*inputs, **launch, SUMMARY=False)
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, starts, seg_dt)
        ctx.flags = flags
        return out

    @staticmethod
    def backward(ctx, dout: Tensor) -> tuple[Tensor | None, ...]:
        u, delta, A, B, C, D, z, delta_bias, starts, seg_dt = ctx.saved_tensors
        grid, sizes = _launch_config(u, A, B)
        batch, dim, length = u.shape
        f32 = dict(dtype=torch.float32, device=u.device)
        du, ddelta = torch.empty_like(u), torch.empty_like(delta)
        dz = torch.empty_like(z) if z is not None else None
        seg_carry = torch.zeros(batch, dim, grid[2], A.shape[1], **f32)
        scratch = torch.empty(grid[0] * grid[1] * grid[2], TILES, sizes["BLOCK_N"], sizes["BLOCK_D"], **f32)
        dA_part = torch.empty(batch, grid[2], *A.shape, **f32)
        dB, dC = (torch.zeros_like(B, dtype=torch.float32) for _ in range(2))
        dD_part, dbias_part = (torch.empty(batch, grid[2], dim, **f32) for _ in range(2))
        arguments = (u, delta, A, B, C, D if D is not None else u, z if z is not None else u,
                     delta_bias if delta_bias is not None else u, _in_layout(dout, _token_major(u)), starts,
                     seg_carry, scratch, du, ddelta, dz if dz is not None else du, dA_part, dB, dC, dD_part, dbias_part)
        launch = dict(**sizes, **_strides(u, B), **ctx.flags, num_warps=NUM_WARPS)
        with _on_device(u):
            if grid[2] > 1:
                _backward_kernel[grid](*arguments, **launch, SUMMARY=True)
                _carry_between_segments(seg_carry, seg_dt, A, sizes, reverse=True)
            _backward_kernel[grid](*arguments, **launch, SUMMARY=False)
        dD = dD_part.sum((0, 1)).to(D.dtype) if D is not None else None
        dbias = dbias_part.sum((0, 1)).to(delta_bias.dtype) if delta_bias is not None else None
        return du, ddelta, dA_part.sum((0, 1)).to(A.dtype), dB.to(B.dtype), dC.to(C.dtype), dD, dz, dbias, None


def triton_selective_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
                          z: Tensor | None = None, delta_bias: Tensor | None = None,
                          delta_softplus: bool = False) -> Tensor:
    """`scan.selective_scan` (same arguments, shapes and result, mamba-ssm's `selective_scan_fn` contract)
    computed by the Triton kernels, fp32 inside. Token-major u ((batch, L, dim) in memory, channels contiguous)
    runs without copies when delta, z, B and C are token-major too; otherwise they are laid out like u."""
    token_major = _token_major(u)
    B = B.unsqueeze(1) if B.dim() == 3 else B
    C = C.unsqueeze(1) if C.dim() == 3 else C
    u, delta, B, C = (_in_layout(t, token_major) for t in (u, delta, B, C))
    z = _in_layout(z, token_major) if z is not None else None
    optional = [t.contiguous() if t is not None else None for t in (D, delta_bias)]
    return _TritonSelectiveScan.apply(u, delta, A.contiguous(), B, C, optional[0], z, optional[1], delta_softplus)
