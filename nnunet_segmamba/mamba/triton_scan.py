"""Selective scan of Mamba (S6) as Triton kernels, same contract as `scan.selective_scan`.

For every batch element b, channel d and state n (B and C shared by the channels of a group):

    delta_t = softplus(delta_t + delta_bias)               (bias and softplus optional)
    h_t = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t   (h_{-1} = 0)
    y_t = sum_n C_t[n] * h_t[n] + D * u_t
    out_t = y_t * silu(z_t)                                 (z optional)

The (batch, dim, L) tensors may have either layout of their last two axes: channels contiguous ("token-major",
(batch, L, dim) in memory: a token's BLOCK_D channels are one contiguous load) or tokens contiguous; B and C
take the same layout. The strides are kernel arguments.

The kernels: `triton_scan_forward.py` (forward, and the recurrence over segments of a long sequence),
`triton_scan_backward.py` (backward); what they share (program layout, tile steps, tuning constants):
`triton_scan_tiles.py`. This module launches them and is the autograd function.

On a machine without a GPU the kernels run under Triton's interpreter (TRITON_INTERPRET=1 set before
triton is imported), which takes CPU tensors as they are.
"""

from __future__ import annotations

import contextlib

import torch
import triton
from torch import Tensor

from nnunet_segmamba.mamba.triton_scan_backward import _backward_kernel
from nnunet_segmamba.mamba.triton_scan_forward import _carry_kernel, _forward_kernel
from nnunet_segmamba.mamba.triton_scan_tiles import TILE, TILES, BLOCK_D, NUM_WARPS, PROGRAMS_PER_SM, MIN_SEGMENT_BLOCKS


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
                z: Tensor | None, delta_bias: Tensor | None, delta_softplus: bool, for_backward: bool) -> Tensor:
        grid, sizes = _launch_config(u, A, B)
        flags = dict(HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
                     SOFTPLUS=delta_softplus)
        batch, dim, _ = u.shape
        f32 = dict(dtype=torch.float32, device=u.device)
        out = torch.empty_like(u)
        starts = torch.empty(batch, dim, sizes["n_blocks"], A.shape[1], **f32) if for_backward else None
        seg_state = torch.zeros(batch, dim, grid[2], A.shape[1], **f32)
        seg_dt = torch.zeros(batch, dim, grid[2], **f32)
        inputs = (u, delta, A, B, C, D if D is not None else u, z if z is not None else u,
                  delta_bias if delta_bias is not None else u, out, starts if for_backward else out, seg_state, seg_dt)
        launch = dict(**sizes, **_strides(u, B), **flags, num_warps=NUM_WARPS)
        with _on_device(u):
            if grid[2] > 1:
                _forward_kernel[grid](*inputs, **launch, SUMMARY=True, STARTS=False)
                _carry_between_segments(seg_state, seg_dt, A, sizes, reverse=False)
            _forward_kernel[grid](*inputs, **launch, SUMMARY=False, STARTS=for_backward)
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
        return du, ddelta, dA_part.sum((0, 1)).to(A.dtype), dB.to(B.dtype), dC.to(C.dtype), dD, dz, dbias, None, None


def triton_selective_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
                          z: Tensor | None = None, delta_bias: Tensor | None = None,
                          delta_softplus: bool = False) -> Tensor:
    """`scan.selective_scan` (same arguments, shapes and result, mamba-ssm's `selective_scan_fn` contract)
    computed by the Triton kernels, fp32 inside. Token-major u ((batch, L, dim) in memory, channels contiguous)
    runs without copies when delta, z, B and C are token-major too; otherwise they are laid out like u. Where no
    backward can follow (no grad mode, or no input requiring grad) the forward keeps no checkpoints."""
    token_major = _token_major(u)
    B = B.unsqueeze(1) if B.dim() == 3 else B
    C = C.unsqueeze(1) if C.dim() == 3 else C
    u, delta, B, C = (_in_layout(t, token_major) for t in (u, delta, B, C))
    z = _in_layout(z, token_major) if z is not None else None
    optional = [t.contiguous() if t is not None else None for t in (D, delta_bias)]
    inputs = (u, delta, A.contiguous(), B, C, optional[0], z, optional[1])
    for_backward = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs)
    return _TritonSelectiveScan.apply(*inputs, delta_softplus, for_backward)
