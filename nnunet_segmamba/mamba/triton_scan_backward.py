"""The Triton scan's backward kernel (`triton_scan.py` states the recurrence, `triton_scan_tiles.py` the tile
steps).

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
"""

from __future__ import annotations

import triton
import triton.language as tl

from nnunet_segmamba.mamba.triton_scan_tiles import (
    _program_tiles, _load_tile, _store_tile, _add_tile, _delta_tile, _decay, _drive, _states, _reverse_scan, _row,
    _segment, _shift_up,
)


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
            decay = _decay(dt, A_tile)
            suffix_decay, suffix = _reverse_scan(_shift_up(decay, TILE), dy[:, None, :] * C_t[:, :, None])
            dh = suffix + suffix_decay * carry[None, :, :]
            if not SUMMARY:
                u_t = _load_tile(u + x_base, tokens, token_stride, valid, channels, d_mask)
                B_t = _load_tile(B + bc_base, tokens, bc_token_stride, valid, states, n_mask)
                b_t = _drive(dt, u_t, B_t)
                hs = _states(decay, b_t, tl.load(scratch + scratch_tiles + k * BLOCK_N * BLOCK_D))
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
            carry = _row(decay, 0, TILE) * _row(dh, 0, TILE)
    if SUMMARY:
        tl.store(seg_carry + seg_tiles, carry, mask=nd_mask)
    else:
        part = (b * tl.num_programs(2) + seg) * dim + d
        tl.store(dA_part + part[None, :] * d_state + n[:, None], dA_acc, mask=nd_mask)
        tl.store(dD_part + part, dD_acc, mask=d_mask)
        tl.store(dbias_part + part, dbias_acc, mask=d_mask)
