"""Selective scan of Mamba (S6) as two Triton kernels, same contract as `scan.selective_scan`.

For every batch element b, channel d and state n (B and C shared by the channels of a group):

    delta_t = softplus(delta_t + delta_bias)               (bias and softplus optional)
    h_t = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t   (h_{-1} = 0)
    y_t = sum_n C_t[n] * h_t[n] + D * u_t
    out_t = y_t * silu(z_t)                                 (z optional)

Forward: one program per (batch, group, block of BLOCK_D channels of the group) walks the tokens one
after another with the state h (BLOCK_D, BLOCK_N) in registers. At the start of every CHUNK tokens it
writes h to `starts` (batch, dim, ceil(L / CHUNK), N), fp32: all that the backward keeps besides the
inputs, never O(L * N).

Backward: the same grid walks the chunks from last to first. It recomputes the chunk's states from the
saved start state into `scratch` (batch, dim, CHUNK + 1, N) (slot 0: h_{start-1}, slot k: the k-th
state of the chunk), then runs the adjoint backwards over the chunk:

    dy_t = dout_t * silu(z_t)                          dz_t = dout_t * y_t * silu'(z_t)
    dh_t = exp(delta_{t+1} A) * dh_{t+1} + C_t * dy_t
    g_t = dh_t * exp(delta_t A) * h_{t-1}              (gradient of the exponent delta_t * A)
    du_t = delta_t * sum_n dh_t B_t + D * dy_t
    ddelta_t = (sum_n g_t A + u_t * sum_n dh_t B_t) * sigmoid(delta_t + delta_bias)   (sigmoid if softplus)
    dA = sum_{b,t} g_t delta_t     dB_t = sum_{d in group} dh_t delta_t u_t     dC_t = sum_{d in group} h_t dy_t
    dD = sum_{b,t} dy_t u_t        d(delta_bias) = sum_{b,t} ddelta_t

Gradients shared across programs are reduced without atomics: dA, dD and d(delta_bias) per (b, d) and dB,
dC per channel block are written as fp32 partial sums and summed in PyTorch, so results are deterministic.
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

CHUNK = 64
"""Tokens between two saved states; the backward recomputes one chunk of states at a time."""

MAX_BLOCK_D = 16
"""Most channels per program (a power of two)."""


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
def _forward_kernel(
    u, delta, A, B, C, D, z, bias, out, starts,
    dim, groups, per_group, length, d_state, n_chunks,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """out (batch, dim, L) and the chunk start states (batch, dim, n_chunks, N) of one channel block."""
    b, g, block, d, n, d_mask, n_mask, dn_mask, A_tile, D_vec, bias_vec = _program_tiles(
        A, D, bias, dim, groups, per_group, d_state, HAS_D, HAS_BIAS, BLOCK_D, BLOCK_N)
    rows = (b * dim + d).to(tl.int64) * length  # u, delta, z, out: (BLOCK_D,)
    bc_rows = ((b * groups + g) * d_state + n).to(tl.int64) * length  # B, C: (BLOCK_N,)
    start_tiles = ((b * dim + d).to(tl.int64) * n_chunks * d_state)[:, None] + n[None, :]
    h = tl.zeros((BLOCK_D, BLOCK_N), tl.float32)
    for c in range(0, n_chunks):
        tl.store(starts + start_tiles + c * d_state, h, mask=dn_mask)
        for t in range(c * CHUNK, tl.minimum(c * CHUNK + CHUNK, length)):
            raw = tl.load(delta + rows + t, mask=d_mask, other=0.0).to(tl.float32) + bias_vec
            dt = _softplus(raw) if SOFTPLUS else raw
            u_t = tl.load(u + rows + t, mask=d_mask, other=0.0).to(tl.float32)
            B_t = tl.load(B + bc_rows + t, mask=n_mask, other=0.0).to(tl.float32)
            C_t = tl.load(C + bc_rows + t, mask=n_mask, other=0.0).to(tl.float32)
            h = tl.exp(dt[:, None] * A_tile) * h + (dt * u_t)[:, None] * B_t[None, :]
            y = tl.sum(h * C_t[None, :], axis=1) + D_vec * u_t
            if HAS_Z:
                z_t = tl.load(z + rows + t, mask=d_mask, other=0.0).to(tl.float32)
                y = y * z_t * tl.sigmoid(z_t)
            tl.store(out + rows + t, y, mask=d_mask)


@triton.jit
def _backward_kernel(
    u, delta, A, B, C, D, z, bias, dout, starts, scratch,
    du, ddelta, dz, dA_part, dB_part, dC_part, dD_part, dbias_part,
    dim, groups, per_group, length, d_state, n_chunks,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """du, ddelta, dz (batch, dim, L); partial sums dA (batch, dim, N), dD and dbias (batch, dim), and
    dB, dC (batch, groups, n_blocks, N, L) of one channel block."""
    b, g, block, d, n, d_mask, n_mask, dn_mask, A_tile, D_vec, bias_vec = _program_tiles(
        A, D, bias, dim, groups, per_group, d_state, HAS_D, HAS_BIAS, BLOCK_D, BLOCK_N)
    rows = (b * dim + d).to(tl.int64) * length
    bc_rows = ((b * groups + g) * d_state + n).to(tl.int64) * length
    part_rows = (((b * groups + g) * tl.num_programs(1) + block) * d_state + n).to(tl.int64) * length
    start_tiles = ((b * dim + d).to(tl.int64) * n_chunks * d_state)[:, None] + n[None, :]
    scratch_tiles = ((b * dim + d).to(tl.int64) * (CHUNK + 1) * d_state)[:, None] + n[None, :]
    dh_next = tl.zeros((BLOCK_D, BLOCK_N), tl.float32)  # exp(delta_{t+1} A) * dh_{t+1}
    dA_acc = tl.zeros((BLOCK_D, BLOCK_N), tl.float32)
    dD_acc = tl.zeros((BLOCK_D,), tl.float32)
    dbias_acc = tl.zeros((BLOCK_D,), tl.float32)
    for i in range(0, n_chunks):
        c = n_chunks - 1 - i
        first = c * CHUNK
        count = tl.minimum(first + CHUNK, length) - first
        h = tl.load(starts + start_tiles + c * d_state, mask=dn_mask, other=0.0)
        tl.store(scratch + scratch_tiles, h, mask=dn_mask)
        for k in range(0, count):  # recompute the chunk's states
            raw = tl.load(delta + rows + first + k, mask=d_mask, other=0.0).to(tl.float32) + bias_vec
            dt = _softplus(raw) if SOFTPLUS else raw
            u_t = tl.load(u + rows + first + k, mask=d_mask, other=0.0).to(tl.float32)
            B_t = tl.load(B + bc_rows + first + k, mask=n_mask, other=0.0).to(tl.float32)
            h = tl.exp(dt[:, None] * A_tile) * h + (dt * u_t)[:, None] * B_t[None, :]
            tl.store(scratch + scratch_tiles + (k + 1) * d_state, h, mask=dn_mask)
        tl.debug_barrier()
        for j in range(0, count):  # adjoint, last token of the chunk first
            k = count - 1 - j
            t = first + k
            raw = tl.load(delta + rows + t, mask=d_mask, other=0.0).to(tl.float32) + bias_vec
            dt = _softplus(raw) if SOFTPLUS else raw
            u_t = tl.load(u + rows + t, mask=d_mask, other=0.0).to(tl.float32)
            B_t = tl.load(B + bc_rows + t, mask=n_mask, other=0.0).to(tl.float32)
            C_t = tl.load(C + bc_rows + t, mask=n_mask, other=0.0).to(tl.float32)
            dy = tl.load(dout + rows + t, mask=d_mask, other=0.0).to(tl.float32)
            h_prev = tl.load(scratch + scratch_tiles + k * d_state, mask=dn_mask, other=0.0)
            h_t = tl.load(scratch + scratch_tiles + (k + 1) * d_state, mask=dn_mask, other=0.0)
            if HAS_Z:
                z_t = tl.load(z + rows + t, mask=d_mask, other=0.0).to(tl.float32)
                sig = tl.sigmoid(z_t)
                y = tl.sum(h_t * C_t[None, :], axis=1) + D_vec * u_t
                tl.store(dz + rows + t, dy * y * sig * (1.0 + z_t * (1.0 - sig)), mask=d_mask)
                dy = dy * z_t * sig
            dh = dh_next + dy[:, None] * C_t[None, :]
            decay = tl.exp(dt[:, None] * A_tile)
            d_exponent = dh * decay * h_prev
            dh_B = tl.sum(dh * B_t[None, :], axis=1)
            d_dt = tl.sum(d_exponent * A_tile, axis=1) + dh_B * u_t
            if SOFTPLUS:
                d_dt = d_dt * tl.sigmoid(raw)
            tl.store(du + rows + t, dh_B * dt + D_vec * dy, mask=d_mask)
            tl.store(ddelta + rows + t, d_dt, mask=d_mask)
            tl.store(dB_part + part_rows + t, tl.sum(dh * (dt * u_t)[:, None], axis=0), mask=n_mask)
            tl.store(dC_part + part_rows + t, tl.sum(h_t * dy[:, None], axis=0), mask=n_mask)
            dA_acc += d_exponent * dt[:, None]
            dD_acc += dy * u_t
            dbias_acc += d_dt
            dh_next = decay * dh
        tl.debug_barrier()  # the next chunk overwrites the scratch
    tl.store(dA_part + (b * dim + d)[:, None] * d_state + n[None, :], dA_acc, mask=dn_mask)
    tl.store(dD_part + b * dim + d, dD_acc, mask=d_mask)
    tl.store(dbias_part + b * dim + d, dbias_acc, mask=d_mask)


def _launch_config(u: Tensor, A: Tensor, B: Tensor) -> tuple[tuple[int, int], dict]:
    """Grid (batch * groups, channel blocks per group) and the sizes every kernel takes."""
    batch, dim, length = u.shape
    groups, d_state = B.shape[1], A.shape[1]
    per_group = dim // groups
    block_d = min(MAX_BLOCK_D, triton.next_power_of_2(per_group))
    grid = (batch * groups, triton.cdiv(per_group, block_d))
    sizes = dict(dim=dim, groups=groups, per_group=per_group, length=length, d_state=d_state,
                 n_chunks=triton.cdiv(length, CHUNK), CHUNK=CHUNK, BLOCK_D=block_d,
                 BLOCK_N=triton.next_power_of_2(d_state))
    return grid, sizes


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
        out = torch.empty_like(u)
        starts = u.new_empty(u.shape[0], u.shape[1], sizes["n_chunks"], A.shape[1], dtype=torch.float32)
        with _on_device(u):
            _forward_kernel[grid](u, delta, A, B, C, D if D is not None else u, z if z is not None else u,
                                  delta_bias if delta_bias is not None else u, out, starts, **sizes, **flags)
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, starts)
        ctx.flags = flags
        return out

    @staticmethod
    def backward(ctx, dout: Tensor) -> tuple[Tensor | None, ...]:
        u, delta, A, B, C, D, z, delta_bias, starts = ctx.saved_tensors
        grid, sizes = _launch_config(u, A, B)
        batch, dim, length = u.shape
        f32 = dict(dtype=torch.float32, device=u.device)
        scratch = torch.empty(batch, dim, CHUNK + 1, A.shape[1], **f32)
        du, ddelta = torch.empty_like(u), torch.empty_like(delta)
        dz = torch.empty_like(z) if z is not None else None
        dA_part = torch.empty(batch, *A.shape, **f32)
        dB_part, dC_part = (torch.empty(batch, B.shape[1], grid[1], A.shape[1], length, **f32) for _ in range(2))
        dD_part, dbias_part = (torch.empty(batch, dim, **f32) for _ in range(2))
        with _on_device(u):
            _backward_kernel[grid](
                u, delta, A, B, C, D if D is not None else u, z if z is not None else u,
                delta_bias if delta_bias is not None else u, dout.contiguous(), starts, scratch,
                du, ddelta, dz if dz is not None else du, dA_part, dB_part, dC_part, dD_part, dbias_part,
                **sizes, **ctx.flags)
        dD = dD_part.sum(0).to(D.dtype) if D is not None else None
        dbias = dbias_part.sum(0).to(delta_bias.dtype) if delta_bias is not None else None
        return (du, ddelta, dA_part.sum(0).to(A.dtype), dB_part.sum(2).to(B.dtype), dC_part.sum(2).to(C.dtype),
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
