"""The Triton scan's forward kernels (`triton_scan.py` states the recurrence, `triton_scan_tiles.py` the tile
steps): `_forward_kernel` and `_carry_kernel`, the recurrence over segments that both directions use.

Segments make long sequences parallel (one walk over L tokens per channel block leaves most SMs idle
at L = 32768). A segment's start state is linear in the previous one: h_end = exp(A * S) h_start + H, with S
the sum of the segment's deltas and H the state it reaches from zero. So the forward runs three launches: the
kernel in SUMMARY mode (H and S of every segment, in parallel), `_carry_kernel` (the short sequential
recurrence over segments, giving their start states), and the kernel again from those starts. One segment
(short sequences, or channel blocks enough to fill the GPU) needs only the last launch. The forward writes the
state before every block of TILES tiles to `starts` (batch, dim, ceil(L / (TILE * TILES)), N), fp32: all that the
backward keeps besides the inputs (and S), never O(L * N). With TILE * TILES = 32 tokens and N = 16 these are as
many bytes as an fp16 u, so a forward that no backward follows (inference) does not write them.
"""

from __future__ import annotations

import triton
import triton.language as tl

from nnunet_segmamba.mamba.triton_scan_tiles import (
    _program_tiles, _load_tile, _store_tile, _delta_tile, _decay, _drive, _states, _row, _segment,
)


@triton.jit
def _forward_kernel(
    u, delta, A, B, C, D, z, bias, out, starts, seg_state, seg_dt,
    dim, groups, per_group, length, d_state, n_blocks, seg_blocks,
    channel_stride, token_stride, state_stride, bc_token_stride,
    SUMMARY: tl.constexpr, STARTS: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr, TILE: tl.constexpr, TILES: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One channel block over one segment of checkpoint blocks (TILES tiles of TILE tokens each). SUMMARY: the
    state the segment reaches from h = 0 into seg_state (batch, dim, n_segments, N) and the sum of its deltas
    into seg_dt (batch, dim, n_segments). Otherwise, from the segment's start state in seg_state: out, and with
    STARTS (what the backward needs; not in inference) the state before every block into starts (batch, dim,
    n_blocks, N)."""
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
        if STARTS and not SUMMARY:
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
