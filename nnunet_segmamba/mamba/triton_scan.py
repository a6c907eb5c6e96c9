"""Selective scan of Mamba (S6) as two Triton kernels, same contract as `scan.selective_scan`.

For every batch element b, channel d and state n (B and C shared by the channels of a group):

    delta_t = softplus(delta_t + delta_bias)               (bias and softplus optional)
    h_t = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t   (h_{-1} = 0)
    y_t = sum_n C_t[n] * h_t[n] + D * u_t
    out_t = y_t * silu(z_t)                                 (z optional)

Both kernels run one program per (batch, group, block of BLOCK_D channels of the group, segment of the
sequence) and walk their segment in chunks of CHUNK tokens, from chunk to chunk carrying only the state h
(BLOCK_D, BLOCK_N).
Inside a chunk all tokens are handled at once: u, delta, z, out are (BLOCK_D, CHUNK) tiles and B, C
(BLOCK_N, CHUNK) tiles, loaded and stored along the contiguous token axis, and the steps

    a_t = exp(delta_t * A),   b_t = delta_t * u_t * B_t          (BLOCK_D, BLOCK_N, CHUNK) tiles

are composed by `tl.associative_scan` along the token axis. The step h -> a h + b composes as

    (a1, b1) then (a2, b2) = (a1 * a2, a2 * b1 + b2),

so the inclusive scan from the chunk's first token gives the running product P_t = a_first ... a_t and
the state reached from zero, H_t; with the carried start state h0, h_t = H_t + P_t * h0. Tokens past L
(the tail of the last chunk) are identity steps (a = 1, b = 0), so the last column is the state after
the chunk's last token: the next chunk's start.

Segments make long sequences parallel (one walk over L / CHUNK chunks per channel block leaves most SMs idle
at L = 32768). A segment's start state is linear in the previous one: h_end = exp(A * S) h_start + H, with S
the sum of the segment's deltas and H the state it reaches from zero. So the forward runs three launches: the
kernel in SUMMARY mode (H and S of every segment, in parallel), `_carry_kernel` (the short sequential
recurrence over segments, giving their start states), and the kernel again from those starts. One segment
(short sequences, or channel blocks enough to fill the GPU) needs only the last launch. The forward writes
every chunk's start state to `starts` (batch, dim, ceil(L / CHUNK), N), fp32: all that the backward keeps
besides the inputs (and S), never O(L * N).

Backward: the same grid walks each segment's chunks from last to first. From the chunk's saved start state it
recomputes the states before every token, h_{t-1}, with the same scan over the steps shifted by one
token (the first a no-op), then h_t = a_t h_{t-1} + b_t token by token as in the forward recurrence.
The adjoint runs backwards,

    dy_t = dout_t * silu(z_t)                          dz_t = dout_t * y_t * silu'(z_t)
    dh_t = a_{t+1} * dh_{t+1} + C_t * dy_t,

the same step composition scanned in reverse (`reverse=True`: the left operand holds the later tokens)
over (a_{t+1}, C_t dy_t), where the chunk's last token takes a = 1 and the carry a_{t+1} dh_{t+1} from
the later chunk is added as dh_t += Q_t * carry (Q_t = a_{t+1} ... a_last). Between segments the carry
follows the same kind of recurrence, carry_in = exp(A * S) carry_out + K (K: the carry a segment passes on
from a zero carry), so with several segments a SUMMARY pass (K only: no states) and `_carry_kernel` in
reverse come first, as in the forward. Then per token

    g_t = dh_t * exp(delta_t A) * h_{t-1}              (gradient of the exponent delta_t * A)
    du_t = delta_t * sum_n dh_t B_t + D * dy_t
    ddelta_t = (sum_n g_t A + u_t * sum_n dh_t B_t) * sigmoid(delta_t + delta_bias)   (sigmoid if softplus)
    dA = sum_{b,t} g_t delta_t     dB_t = sum_{d in group} dh_t delta_t u_t     dC_t = sum_{d in group} h_t dy_t
    dD = sum_{b,t} dy_t u_t        d(delta_bias) = sum_{b,t} ddelta_t

Gradients shared across programs: dA, dD and d(delta_bias) are written per (b, segment, d) as fp32 partial sums and
summed in PyTorch (deterministic). dB and dC are sums over the channels of a group, each program's share an (N,
CHUNK) tile per chunk: those are added atomically into PARTIAL_SUMS fp32 (N, L) slices per group (channel block k
into slice k mod PARTIAL_SUMS), summed in PyTorch. Fewer slices need less memory; the order of the atomic adds
varies, so dB and dC vary in the last bits from run to run, as mamba-ssm's do (deterministic when PARTIAL_SUMS is at
least the number of channel blocks).
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

CHUNK = 32
"""Tokens scanned at once (a power of two); one saved state per chunk, carried between chunks."""

MAX_BLOCK_D = 16
"""Most channels per program (a power of two)."""

MAX_TILE = 512
"""Most elements of one (BLOCK_D, BLOCK_N, CHUNK) fp32 tile: one channel per program at d_state 16. Measured on
an H200 (BENCHMARKS.md, `.ci/gpu sweep-triton`): small programs of one warp are 1.5-3x faster than tiles of 4096
elements over 8 warps (the scans along the token axis then stay inside a warp)."""

PARTIAL_SUMS = 1
"""(N, L) fp32 slices per group into which the backward adds dB and dC (see the module docstring): dB and dC
take (batch, groups, PARTIAL_SUMS, N, L) fp32 each while the backward runs. One slice per one-channel block (the
deterministic store this replaced) was 3.2 GB each for a d_model-128 tri-orientated layer at 32^3 tokens, batch 2."""

NUM_WARPS = 1
"""Warps per program: a 512-element tile is 16 fp32 registers per thread."""

PROGRAMS_PER_SM = 8
"""Programs per SM below which the sequence is split into segments scanned in parallel (`_segment_chunks`):
batch 2 at a 128^3 plan's Mamba stages has 11 or more per SM, where the two extra passes cost more than
they gain (H200: 45% slower at 32^3 tokens when split to 64 per SM)."""

MIN_SEGMENT_CHUNKS = 4
"""Fewest chunks in a segment."""


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
    their masks, A (BLOCK_D, BLOCK_N), D and delta_bias (BLOCK_D,) (zeros when absent), fp32."""
    b = tl.program_id(0) // groups
    g = tl.program_id(0) % groups
    block = tl.program_id(1)
    local = block * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = local < per_group
    d = g * per_group + local
    n = tl.arange(0, BLOCK_N)
    n_mask = n < d_state
    dn_mask = d_mask[:, None] & n_mask[None, :]
    A_tile = tl.load(A + d[:, None] * d_state + n[None, :], mask=dn_mask, other=0.0).to(tl.float32)
    D_vec = tl.zeros((BLOCK_D,), tl.float32)
    if HAS_D:
        D_vec += tl.load(D + d, mask=d_mask, other=0.0).to(tl.float32)
    bias_vec = tl.zeros((BLOCK_D,), tl.float32)
    if HAS_BIAS:
        bias_vec += tl.load(bias + d, mask=d_mask, other=0.0).to(tl.float32)
    return b, g, block, d, n, d_mask, n_mask, dn_mask, A_tile, D_vec, bias_vec


@triton.jit
def _load_tile(ptr, rows, row_mask, tokens, valid):
    """fp32 tile (rows, T) of a (..., L) tensor: rows (R,) are row offsets, tokens (T,) the tokens; 0 where
    row_mask (R,) or valid (T,) is false."""
    mask = row_mask[:, None] & valid[None, :]
    return tl.load(ptr + rows[:, None] + tokens[None, :], mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _store_tile(ptr, rows, row_mask, tokens, valid, value):
    """Store value (R, T) at rows (R,) and tokens (T,) where row_mask and valid hold."""
    tl.store(ptr + rows[:, None] + tokens[None, :], value, mask=row_mask[:, None] & valid[None, :])


@triton.jit
def _add_tile(ptr, rows, row_mask, tokens, valid, value):
    """Add value (R, T) atomically at rows (R,) and tokens (T,) where row_mask and valid hold."""
    tl.atomic_add(ptr + rows[:, None] + tokens[None, :], value, mask=row_mask[:, None] & valid[None, :], sem="relaxed")


@triton.jit
def _delta_tile(delta, rows, d_mask, tokens, valid, bias_vec, SOFTPLUS: tl.constexpr):
    """delta_t (BLOCK_D, T) after bias and softplus, 0 at invalid tokens (an identity step there), and
    raw = delta + bias before the softplus."""
    raw = _load_tile(delta, rows, d_mask, tokens, valid) + bias_vec[:, None]
    dt = _softplus(raw) if SOFTPLUS else raw
    return tl.where(valid[None, :], dt, 0.0), raw


@triton.jit
def _decay(dt, A_tile):
    """a_t = exp(delta_t A): (BLOCK_D, BLOCK_N, T) from delta (BLOCK_D, T) and A (BLOCK_D, BLOCK_N)."""
    return tl.exp(dt[:, None, :] * A_tile[:, :, None])


@triton.jit
def _drive(dt, u_t, B_t):
    """b_t = delta_t u_t B_t: (BLOCK_D, BLOCK_N, T) from delta, u (BLOCK_D, T) and B (BLOCK_N, T)."""
    return (dt * u_t)[:, None, :] * B_t[None, :, :]


@triton.jit
def _states(a, b, h0):
    """h_t = a_t h_{t-1} + b_t for every t of the last axis, h_{-1} = h0 (BLOCK_D, BLOCK_N):
    the scan H_t, P_t of the steps from zero, plus P_t * h0. a, b, result: (BLOCK_D, BLOCK_N, T)."""
    decay, local = tl.associative_scan((a, b), 2, _compose)
    return local + decay * h0[:, :, None]


@triton.jit
def _column(x, cols, index):
    """x[..., index] of a (..., T) tile, cols = arange(T)."""
    return tl.sum(tl.where(cols == index, x, 0.0), axis=len(x.shape) - 1)


@triton.jit
def _segment(n_chunks, seg_chunks):
    """This program's segment: its index and its chunks [first, last)."""
    seg = tl.program_id(2)
    first = seg * seg_chunks
    return seg, first, tl.minimum(first + seg_chunks, n_chunks)


@triton.jit
def _forward_kernel(
    u, delta, A, B, C, D, z, bias, out, starts, seg_state, seg_dt,
    dim, groups, per_group, length, d_state, n_chunks, seg_chunks,
    SUMMARY: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr, CHUNK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One channel block over one segment of chunks. SUMMARY: the state the segment reaches from h = 0 into
    seg_state (batch, dim, n_segments, N) and the sum of its deltas into seg_dt (batch, dim, n_segments).
    Otherwise, from the segment's start state in seg_state: out (batch, dim, L) and the chunk start states
    (batch, dim, n_chunks, N)."""
    b, g, block, d, n, d_mask, n_mask, dn_mask, A_tile, D_vec, bias_vec = _program_tiles(
        A, D, bias, dim, groups, per_group, d_state, HAS_D, HAS_BIAS, BLOCK_D, BLOCK_N)
    seg, first, last = _segment(n_chunks, seg_chunks)
    rows = (b * dim + d).to(tl.int64) * length  # u, delta, z, out: (BLOCK_D,)
    bc_rows = ((b * groups + g) * d_state + n).to(tl.int64) * length  # B, C: (BLOCK_N,)
    start_tiles = ((b * dim + d).to(tl.int64) * n_chunks * d_state)[:, None] + n[None, :]
    seg_rows = (b * dim + d).to(tl.int64) * tl.num_programs(2) + seg
    seg_tiles = (seg_rows * d_state)[:, None] + n[None, :]
    cols = tl.arange(0, CHUNK)
    h = tl.zeros((BLOCK_D, BLOCK_N), tl.float32)
    if not SUMMARY:
        h += tl.load(seg_state + seg_tiles, mask=dn_mask, other=0.0)
    dt_sum = tl.zeros((BLOCK_D,), tl.float32)
    for c in range(first, last):
        tokens = c * CHUNK + cols
        valid = tokens < length
        dt, _ = _delta_tile(delta, rows, d_mask, tokens, valid, bias_vec, SOFTPLUS)
        u_t = _load_tile(u, rows, d_mask, tokens, valid)
        states = _states(_decay(dt, A_tile), _drive(dt, u_t, _load_tile(B, bc_rows, n_mask, tokens, valid)), h)
        if SUMMARY:
            dt_sum += tl.sum(dt, axis=1)
        else:
            tl.store(starts + start_tiles + c * d_state, h, mask=dn_mask)
            C_t = _load_tile(C, bc_rows, n_mask, tokens, valid)
            y = tl.sum(states * C_t[None, :, :], axis=1) + D_vec[:, None] * u_t
            if HAS_Z:
                z_t = _load_tile(z, rows, d_mask, tokens, valid)
                y = y * z_t * tl.sigmoid(z_t)
            _store_tile(out, rows, d_mask, tokens, valid, y)
        h = _column(states, cols, CHUNK - 1)  # tail tokens are identity steps: the state after token L - 1
    if SUMMARY:
        tl.store(seg_state + seg_tiles, h, mask=dn_mask)
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
    dn_mask = d_mask[:, None] & (n < d_state)[None, :]
    A_tile = tl.load(A + d[:, None] * d_state + n[None, :], mask=dn_mask, other=0.0).to(tl.float32)
    seg_rows = (b * dim + d).to(tl.int64) * n_segments
    carry = tl.zeros((BLOCK_D, BLOCK_N), tl.float32)
    for i in range(0, n_segments):
        if REVERSE:
            s = n_segments - 1 - i
        else:
            s = i
        tiles = ((seg_rows + s) * d_state)[:, None] + n[None, :]
        own = tl.load(seg_state + tiles, mask=dn_mask, other=0.0)
        tl.store(seg_state + tiles, carry, mask=dn_mask)
        carry = tl.exp(tl.load(seg_dt + seg_rows + s, mask=d_mask, other=0.0)[:, None] * A_tile) * carry + own


@triton.jit
def _backward_kernel(
    u, delta, A, B, C, D, z, bias, dout, starts, seg_carry,
    du, ddelta, dz, dA_part, dB_part, dC_part, dD_part, dbias_part,
    dim, groups, per_group, length, d_state, n_chunks, seg_chunks, n_partials,
    SUMMARY: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr, CHUNK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One channel block over one segment of chunks, last chunk first. SUMMARY: the adjoint carry the segment
    passes to earlier tokens from a zero carry, into seg_carry (batch, dim, n_segments, N). Otherwise, from
    the carry in seg_carry: du, ddelta, dz (batch, dim, L); partial sums dA (batch, n_segments, dim, N), dD and
    dbias (batch, n_segments, dim); dB, dC added into (batch, groups, n_partials, N, L)."""
    b, g, block, d, n, d_mask, n_mask, dn_mask, A_tile, D_vec, bias_vec = _program_tiles(
        A, D, bias, dim, groups, per_group, d_state, HAS_D, HAS_BIAS, BLOCK_D, BLOCK_N)
    seg, first, last = _segment(n_chunks, seg_chunks)
    rows = (b * dim + d).to(tl.int64) * length
    bc_rows = ((b * groups + g) * d_state + n).to(tl.int64) * length
    part_rows = (((b * groups + g) * n_partials + block % n_partials) * d_state + n).to(tl.int64) * length
    start_tiles = ((b * dim + d).to(tl.int64) * n_chunks * d_state)[:, None] + n[None, :]
    seg_tiles = (((b * dim + d).to(tl.int64) * tl.num_programs(2) + seg) * d_state)[:, None] + n[None, :]
    cols = tl.arange(0, CHUNK)
    carry = tl.zeros((BLOCK_D, BLOCK_N), tl.float32)  # a_{t+1} * dh_{t+1} after the chunk's last token
    if not SUMMARY:
        carry += tl.load(seg_carry + seg_tiles, mask=dn_mask, other=0.0)
    dA_acc = tl.zeros((BLOCK_D, BLOCK_N), tl.float32)
    dD_acc = tl.zeros((BLOCK_D,), tl.float32)
    dbias_acc = tl.zeros((BLOCK_D,), tl.float32)
    for i in range(0, last - first):
        c = last - 1 - i
        tokens = c * CHUNK + cols
        valid = tokens < length
        dt, raw = _delta_tile(delta, rows, d_mask, tokens, valid, bias_vec, SOFTPLUS)
        C_t = _load_tile(C, bc_rows, n_mask, tokens, valid)
        dout_t = _load_tile(dout, rows, d_mask, tokens, valid)
        dy = dout_t
        if HAS_Z:
            z_t = _load_tile(z, rows, d_mask, tokens, valid)
            sig = tl.sigmoid(z_t)
            dy = dout_t * z_t * sig

        # adjoint: reverse scan of (a_{t+1}, C_t dy_t), the last token's a_{t+1} = 1, plus the later carry.
        # Tail tokens exist only in the last chunk, whose carry is 0: there dh = 0 and nothing is added.
        after, after_valid = tokens + 1, (cols < CHUNK - 1) & (tokens + 1 < length)
        dt_after, _ = _delta_tile(delta, rows, d_mask, after, after_valid, bias_vec, SOFTPLUS)
        suffix_decay, suffix = tl.associative_scan(
            (_decay(dt_after, A_tile), dy[:, None, :] * C_t[None, :, :]), 2, _compose, reverse=True)
        dh = suffix + suffix_decay * carry[:, :, None]
        if not SUMMARY:
            # states: h_{t-1} by the scan of the steps one token back (the chunk's first one a no-op)
            u_t = _load_tile(u, rows, d_mask, tokens, valid)
            B_t = _load_tile(B, bc_rows, n_mask, tokens, valid)
            before, before_valid = tokens - 1, valid & (cols > 0)
            dt_before, _ = _delta_tile(delta, rows, d_mask, before, before_valid, bias_vec, SOFTPLUS)
            h0 = tl.load(starts + start_tiles + c * d_state, mask=dn_mask, other=0.0)
            h_before = _states(_decay(dt_before, A_tile),
                               _drive(dt_before, _load_tile(u, rows, d_mask, before, before_valid),
                                      _load_tile(B, bc_rows, n_mask, before, before_valid)), h0)
            decayed = _decay(dt, A_tile) * h_before  # exp(delta_t A) h_{t-1}
            h = decayed + _drive(dt, u_t, B_t)
            if HAS_Z:
                y = tl.sum(h * C_t[None, :, :], axis=1) + D_vec[:, None] * u_t
                _store_tile(dz, rows, d_mask, tokens, valid, dout_t * y * sig * (1.0 + z_t * (1.0 - sig)))
            _add_tile(dC_part, part_rows, n_mask, tokens, valid, tl.sum(h * dy[:, None, :], axis=0))
            d_exponent = dh * decayed
            dh_B = tl.sum(dh * B_t[None, :, :], axis=1)
            d_dt = tl.sum(d_exponent * A_tile[:, :, None], axis=1) + dh_B * u_t
            if SOFTPLUS:
                d_dt = d_dt * tl.sigmoid(raw)
            _store_tile(du, rows, d_mask, tokens, valid, dh_B * dt + D_vec[:, None] * dy)
            _store_tile(ddelta, rows, d_mask, tokens, valid, d_dt)
            _add_tile(dB_part, part_rows, n_mask, tokens, valid, tl.sum(dh * (dt * u_t)[:, None, :], axis=0))
            dA_acc += tl.sum(d_exponent * dt[:, None, :], axis=2)
            dD_acc += tl.sum(dy * u_t, axis=1)
            dbias_acc += tl.sum(d_dt, axis=1)
        carry = tl.exp(_column(dt, cols, 0)[:, None] * A_tile) * _column(dh, cols, 0)
    if SUMMARY:
        tl.store(seg_carry + seg_tiles, carry, mask=dn_mask)
    else:
        part = (b * tl.num_programs(2) + seg) * dim + d
        tl.store(dA_part + part[:, None] * d_state + n[None, :], dA_acc, mask=dn_mask)
        tl.store(dD_part + part, dD_acc, mask=d_mask)
        tl.store(dbias_part + part, dbias_acc, mask=d_mask)


def _segment_chunks(n_chunks: int, programs: int, device: torch.device) -> int:
    """Chunks per segment: as many segments as bring the grid to PROGRAMS_PER_SM programs per SM of the GPU
    (the `programs` of one segment each take a sequential walk), each at least MIN_SEGMENT_CHUNKS long."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
    segments = max(1, min(PROGRAMS_PER_SM * sms // programs, n_chunks // MIN_SEGMENT_CHUNKS))
    return triton.cdiv(n_chunks, segments)


def _launch_config(u: Tensor, A: Tensor, B: Tensor) -> tuple[tuple[int, int, int], dict]:
    """Grid (batch * groups, channel blocks per group, segments) and the sizes every kernel takes."""
    batch, dim, length = u.shape
    groups, d_state = B.shape[1], A.shape[1]
    per_group = dim // groups
    block_n = triton.next_power_of_2(d_state)
    block_d = min(MAX_BLOCK_D, triton.next_power_of_2(per_group), max(1, MAX_TILE // (block_n * CHUNK)))
    n_chunks = triton.cdiv(length, CHUNK)
    channel_blocks = triton.cdiv(per_group, block_d)
    seg_chunks = _segment_chunks(n_chunks, batch * groups * channel_blocks, u.device)
    grid = (batch * groups, channel_blocks, triton.cdiv(n_chunks, seg_chunks))
    sizes = dict(dim=dim, groups=groups, per_group=per_group, length=length, d_state=d_state,
                 n_chunks=n_chunks, seg_chunks=seg_chunks, CHUNK=CHUNK, BLOCK_D=block_d, BLOCK_N=block_n)
    return grid, sizes


def _carry_between_segments(seg_state: Tensor, seg_dt: Tensor, A: Tensor, sizes: dict, reverse: bool) -> None:
    """`_carry_kernel` over seg_state in place, one program per batch element and block of channels."""
    batch, dim, n_segments, _ = seg_state.shape
    block_d = sizes["BLOCK_D"]
    _carry_kernel[(batch, triton.cdiv(dim, block_d))](seg_state, seg_dt, A, dim, sizes["d_state"], n_segments,
                                                      REVERSE=reverse, BLOCK_D=block_d, BLOCK_N=sizes["BLOCK_N"],
                                                      num_warps=1)


def _on_device(t: Tensor) -> contextlib.AbstractContextManager:
    """Launch on t's GPU (Triton launches on the current device); nothing to do for CPU tensors."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


class _TritonSelectiveScan(torch.autograd.Function):
    """Contiguous u, delta, z: (batch, dim, L); A: (dim, N); B, C: (batch, groups, N, L); D, delta_bias: (dim,)."""

    @staticmethod
    def forward(ctx, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None,
                z: Tensor | None, delta_bias: Tensor | None, delta_softplus: bool) -> Tensor:
        grid, sizes = _launch_config(u, A, B)
        flags = dict(HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
                     SOFTPLUS=delta_softplus)
        batch, dim, _ = u.shape
        f32 = dict(dtype=torch.float32, device=u.device)
        out = torch.empty_like(u)
        starts = torch.empty(batch, dim, sizes["n_chunks"], A.shape[1], **f32)
        seg_state = torch.zeros(batch, dim, grid[2], A.shape[1], **f32)
        seg_dt = torch.zeros(batch, dim, grid[2], **f32)
        inputs = (u, delta, A, B, C, D if D is not None else u, z if z is not None else u,
                  delta_bias if delta_bias is not None else u, out, starts, seg_state, seg_dt)
        with _on_device(u):
            if grid[2] > 1:
                _forward_kernel[grid](*inputs, **sizes, **flags, SUMMARY=True, num_warps=NUM_WARPS)
                _carry_between_segments(seg_state, seg_dt, A, sizes, reverse=False)
            _forward_kernel[grid](*inputs, **sizes, **flags, SUMMARY=False, num_warps=NUM_WARPS)
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
        dA_part = torch.empty(batch, grid[2], *A.shape, **f32)
        n_partials = min(PARTIAL_SUMS, grid[1])
        dB_part, dC_part = (torch.zeros(batch, B.shape[1], n_partials, A.shape[1], length, **f32) for _ in range(2))
        dD_part, dbias_part = (torch.empty(batch, grid[2], dim, **f32) for _ in range(2))
        arguments = (u, delta, A, B, C, D if D is not None else u, z if z is not None else u,
                     delta_bias if delta_bias is not None else u, dout.contiguous(), starts, seg_carry,
                     du, ddelta, dz if dz is not None else du, dA_part, dB_part, dC_part, dD_part, dbias_part)
        with _on_device(u):
            if grid[2] > 1:
                _backward_kernel[grid](*arguments, **sizes, **ctx.flags, n_partials=n_partials, SUMMARY=True,
                                       num_warps=NUM_WARPS)
                _carry_between_segments(seg_carry, seg_dt, A, sizes, reverse=True)
            _backward_kernel[grid](*arguments, **sizes, **ctx.flags, n_partials=n_partials, SUMMARY=False,
                                   num_warps=NUM_WARPS)
        dD = dD_part.sum((0, 1)).to(D.dtype) if D is not None else None
        dbias = dbias_part.sum((0, 1)).to(delta_bias.dtype) if delta_bias is not None else None
        return (du, ddelta, dA_part.sum((0, 1)).to(A.dtype), dB_part.sum(2).to(B.dtype), dC_part.sum(2).to(C.dtype),
                dD, dz, dbias, None)


def triton_selective_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
                          z: Tensor | None = None, delta_bias: Tensor | None = None,
                          delta_softplus: bool = False) -> Tensor:
    """`scan.selective_scan` (same arguments, shapes and result, mamba-ssm's `selective_scan_fn` contract)
    computed by the Triton kernels, fp32 inside."""
    B = B.unsqueeze(1) if B.dim() == 3 else B
    C = C.unsqueeze(1) if C.dim() == 3 else C
    optional = [t.contiguous() if t is not None else None for t in (D, z, delta_bias)]
    return _TritonSelectiveScan.apply(u.contiguous(), delta.contiguous(), A.contiguous(), B.contiguous(),
                                      C.contiguous(), *optional, delta_softplus)
