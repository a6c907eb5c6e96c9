"""A Mamba layer's token orders as Triton kernels that read the tokens where they lie (no permuted copies).

The layer's x is row-major over the grid, (batch, L, C) with channels contiguous; the scan takes each order's
tokens as (batch, K * C, L), order k in rows k*C..., tokens contiguous. Order k is a `Walk`: step s of the scan
reads grid index walk_k(s) (`orders.py`). Two kernels move tokens between the layouts through that arithmetic,
one order per launch, each program a block of consecutive steps (tokens contiguous in the order layout) and of
channels (contiguous in the grid layout):

- `_into_order_kernel`, grid -> order k, with a causal depthwise conv1d of TAPS taps, bias and SiLU on the way
  (Mamba's conv1d, eq. of `Mamba`): u_k[s] = SiLU(bias + sum_j w_j x[walk_k(s - TAPS + 1 + j)]), x = 0 before s = 0;
- `_from_order_kernel`, order k -> grid, the transposed taps, added up over the orders' launches:
  out[walk_k(s)] += sum_j w_j v_k[s + TAPS - 1 - j], v = 0 past the end.

`ordered_conv1d_silu` is the first with its backward (`_conv_backward_kernel` for the gradient before the
SiLU and of the weights, then the second for x); `sum_over_orders` (the layer's sum of the scanned orders on
the grid) is the second with one tap of weight 1, its backward the first with one tap. All arithmetic is fp32;
results and gradients take their input's dtype. Sums over tokens (weight and bias gradients) are partial sums
per block of tokens added in PyTorch: deterministic.
"""

from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from nnunet_segmamba.mamba.orders import TokenOrder, Walk
from nnunet_segmamba.mamba.triton_scan import _on_device

BLOCK_L = 64
"""Tokens per program."""

BLOCK_C = 32
"""Channels per program."""

NUM_WARPS = 4


@triton.jit
def _address(s, offset, n1, n2, st0, st1, st2):
    """A `Walk` at indices s: offset + digits of s in the radix (., n1, n2) weighted by (st0, st1, st2)."""
    return offset + s // (n1 * n2) * st0 + s // n2 % n1 * st1 + s % n2 * st2


@triton.jit
def _program_tile(length, channels, BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr):
    """This program's batch element, indices along L (BLOCK_L,), channels (BLOCK_C,) and their masks."""
    index = tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    return tl.program_id(2).to(tl.int64), index, index < length, c, c < channels


@triton.jit
def _grid_tap(x, s, length, token_stride, c, c_mask, offset, n1, n2, st0, st1, st2):
    """x at the grid tokens of steps s (BLOCK_L,) of an order, channels c: a fp32 (BLOCK_L, BLOCK_C) tile, 0 for
    steps outside [0, L)."""
    inside = (s >= 0) & (s < length)
    token = _address(s, offset, n1, n2, st0, st1, st2).to(tl.int64)
    return tl.load(x + token[:, None] * token_stride + c[None, :], mask=inside[:, None] & c_mask[None, :],
                   other=0.0).to(tl.float32)


@triton.jit
def _causal_conv(x, weight, bias, steps, length, token_stride, c, c_mask, row0, offset, n1, n2, st0, st1, st2,
                 TAPS: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_L: tl.constexpr,
                 BLOCK_C: tl.constexpr):
    """bias + sum_j w_j x[walk(s - TAPS + 1 + j)] at the steps s of an order, weight and bias rows row0 + c:
    fp32 (BLOCK_L, BLOCK_C)."""
    acc = tl.zeros((BLOCK_L, BLOCK_C), tl.float32)
    for j in tl.static_range(TAPS):
        tap = _grid_tap(x, steps - (TAPS - 1) + j, length, token_stride, c, c_mask, offset, n1, n2, st0, st1, st2)
        if HAS_WEIGHT:
            tap = tap * tl.load(weight + (row0 + c) * TAPS + j, mask=c_mask, other=0.0).to(tl.float32)[None, :]
        acc += tap
    if HAS_BIAS:
        acc += tl.load(bias + row0 + c, mask=c_mask, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def _into_order_kernel(
    x, weight, bias, out, length, channels, x_batch_stride, token_stride, row0, rows,
    offset, n1, n2, st0, st1, st2,
    TAPS: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Rows row0... of out (batch, rows, L) at steps s: [SiLU](conv over x (batch, L, channels) read along the
    order's walk), with the weights (rows, TAPS) and bias (rows,) of those rows. Program: (block of steps, block
    of channels, batch element)."""
    b, steps, s_mask, c, c_mask = _program_tile(length, channels, BLOCK_L, BLOCK_C)
    pre = _causal_conv(x + b * x_batch_stride, weight, bias, steps, length, token_stride, c, c_mask, row0,
                       offset, n1, n2, st0, st1, st2, TAPS, HAS_WEIGHT, HAS_BIAS, BLOCK_L, BLOCK_C)
    result = pre * tl.sigmoid(pre) if SILU else pre
    tl.store(out + (b * rows + row0) * length + c[None, :] * length + steps[:, None], result,
             mask=s_mask[:, None] & c_mask[None, :])


@triton.jit
def _conv_backward_kernel(
    x, weight, bias, dout, dpre, dweight_part, dbias_part, length, channels, x_batch_stride, token_stride,
    row0, rows, offset, n1, n2, st0, st1, st2,
    TAPS: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """From d(out) (batch, rows, L) of `_into_order_kernel` with SiLU, rows row0...: the gradient before the
    SiLU into the same rows of dpre (batch, rows, L) fp32, and per (batch element, block of steps) the partial
    sums dweight_part (batch, blocks, rows, TAPS) and dbias_part (batch, blocks, rows):
    dw_j = sum_s dpre[s] x[walk(s - TAPS + 1 + j)], dbias = sum_s dpre[s]."""
    b, steps, s_mask, c, c_mask = _program_tile(length, channels, BLOCK_L, BLOCK_C)
    x = x + b * x_batch_stride
    tile = (b * rows + row0) * length + c[None, :] * length + steps[:, None]
    mask = s_mask[:, None] & c_mask[None, :]
    pre = _causal_conv(x, weight, bias, steps, length, token_stride, c, c_mask, row0, offset, n1, n2, st0, st1,
                       st2, TAPS, True, HAS_BIAS, BLOCK_L, BLOCK_C)
    sig = tl.sigmoid(pre)
    grad = tl.load(dout + tile, mask=mask, other=0.0).to(tl.float32)
    grad = grad * sig * (1.0 + pre * (1.0 - sig))  # SiLU'(pre) = sig + pre sig (1 - sig)
    tl.store(dpre + tile, grad, mask=mask)
    part = (b * tl.num_programs(0) + tl.program_id(0)) * rows + row0 + c
    for j in tl.static_range(TAPS):
        tap = _grid_tap(x, steps - (TAPS - 1) + j, length, token_stride, c, c_mask, offset, n1, n2, st0, st1, st2)
        tl.store(dweight_part + part * TAPS + j, tl.sum(grad * tap, axis=0), mask=c_mask)
    tl.store(dbias_part + part, tl.sum(grad, axis=0), mask=c_mask)


@triton.jit
def _from_order_kernel(
    v, weight, out, result, length, channels, row0, rows,
    offset, n1, n2, st0, st1, st2,
    TAPS: tl.constexpr, HAS_WEIGHT: tl.constexpr, ACCUMULATE: tl.constexpr, LAST: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """At the grid tokens walk(s) of steps s: [out +] sum_j w_j v[s + TAPS - 1 - j], v the rows row0... of
    (batch, rows, L) (one order) with their weights (rows, TAPS), into out (batch, L, channels) fp32, or for the
    last order (LAST) into result (batch, L, channels) in its own dtype. Program: (block of steps, block of
    channels, batch element)."""
    b, s, s_mask, c, c_mask = _program_tile(length, channels, BLOCK_L, BLOCK_C)
    p = _address(s, offset, n1, n2, st0, st1, st2)
    v = v + (b * rows + row0) * length
    acc = tl.zeros((BLOCK_L, BLOCK_C), tl.float32)
    for j in tl.static_range(TAPS):
        t = s + (TAPS - 1 - j)
        inside = s_mask & (t < length)
        tap = tl.load(v + c[None, :] * length + t[:, None], mask=inside[:, None] & c_mask[None, :],
                      other=0.0).to(tl.float32)
        if HAS_WEIGHT:
            tap = tap * tl.load(weight + (row0 + c) * TAPS + j, mask=c_mask, other=0.0).to(tl.float32)[None, :]
        acc += tap
    tile = b * length * channels + p[:, None] * channels + c[None, :]
    mask = s_mask[:, None] & c_mask[None, :]
    if ACCUMULATE:
        acc += tl.load(out + tile, mask=mask, other=0.0)
    if LAST:
        tl.store(result + tile, acc, mask=mask)
    else:
        tl.store(out + tile, acc, mask=mask)


Walks = tuple[tuple[int, ...], ...]
"""One `Walk` per order as the kernels' (offset, n1, n2, st0, st1, st2)."""


def _flat(walk: Walk) -> tuple[int, ...]:
    return (walk.offset, *walk.sizes[1:], *walk.strides)


def _walks(grid: Sequence[int], orders: Sequence[TokenOrder]) -> Walks:
    return tuple(_flat(order.walk(tuple(grid))) for order in orders)


def _launch_grid(batch: int, length: int, channels: int) -> tuple[int, int, int]:
    return triton.cdiv(length, BLOCK_L), triton.cdiv(channels, BLOCK_C), batch


BLOCKS = dict(BLOCK_L=BLOCK_L, BLOCK_C=BLOCK_C, num_warps=NUM_WARPS)


def _into_orders(x: Tensor, walks: Walks, weight: Tensor | None, bias: Tensor | None, silu: bool,
                 out: Tensor) -> None:
    """out[:, k*C:(k+1)*C] = `_into_order_kernel` of x (batch, L, C), channels contiguous, for every order k;
    out (batch, K*C, L) contiguous. Kernels take whole tensors and row offsets, never views to write into:
    torch.compile mishandles those (PyTorch issues 192226, 192510; an illegal memory access on torch 2.11)."""
    batch, length, channels = x.shape
    taps = weight.shape[-1] if weight is not None else 1
    for k, walk in enumerate(walks):
        _into_order_kernel[_launch_grid(batch, length, channels)](
            x, weight if weight is not None else x, bias if bias is not None else x, out, length, channels,
            x.stride(0), x.stride(1), k * channels, out.shape[1], *walk, TAPS=taps, HAS_WEIGHT=weight is not None,
            HAS_BIAS=bias is not None, SILU=silu, **BLOCKS)


def _from_orders(v: Tensor, walks: Walks, weight: Tensor | None, result: Tensor) -> None:
    """result (batch, L, C) = the sum over orders k of `_from_order_kernel` of v[:, k*C:(k+1)*C]; v (batch, K*C, L)
    and result contiguous. The partial sums stay fp32 (a buffer); the last order's launch rounds to result's
    dtype (no cast afterwards)."""
    batch, length, channels = result.shape
    taps = weight.shape[-1] if weight is not None else 1
    out = torch.empty(result.shape, dtype=torch.float32, device=result.device) if len(walks) > 1 else result
    for k, walk in enumerate(walks):
        _from_order_kernel[_launch_grid(batch, length, channels)](
            v, weight if weight is not None else v, out, result, length, channels, k * channels, v.shape[1], *walk,
            TAPS=taps, HAS_WEIGHT=weight is not None, ACCUMULATE=k > 0, LAST=k == len(walks) - 1, **BLOCKS)


def _channels_contiguous(x: Tensor) -> Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


class _OrderedConv1dSiLU(torch.autograd.Function):
    """x (batch, L, C), weight (K*C, 1, TAPS), bias (K*C,) -> u (batch, K*C, L)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, walks: Walks) -> Tensor:
        batch, length, channels = x.shape
        u = torch.empty(batch, len(walks) * channels, length, dtype=x.dtype, device=x.device)
        with _on_device(x):
            _into_orders(x, walks, weight, bias, True, u)
        ctx.save_for_backward(x, weight, bias)
        ctx.walks = walks
        return u

    @staticmethod
    def backward(ctx, du: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, bias = ctx.saved_tensors
        walks = ctx.walks
        batch, length, channels = x.shape
        taps = weight.shape[-1]
        f32 = dict(dtype=torch.float32, device=x.device)
        du = du.contiguous()
        dpre = torch.empty(batch, len(walks) * channels, length, **f32)
        blocks = triton.cdiv(length, BLOCK_L)
        dweight_part = torch.empty(batch, blocks, len(walks) * channels, taps, **f32)
        dbias_part = torch.empty(batch, blocks, len(walks) * channels, **f32)
        dx = torch.empty_like(x, memory_format=torch.contiguous_format)
        with _on_device(x):
            for k, walk in enumerate(walks):
                _conv_backward_kernel[_launch_grid(batch, length, channels)](
                    x, weight, bias if bias is not None else x, du, dpre, dweight_part, dbias_part, length,
                    channels, x.stride(0), x.stride(1), k * channels, du.shape[1], *walk, TAPS=taps,
                    HAS_BIAS=bias is not None, **BLOCKS)
            _from_orders(dpre, walks, weight, dx)
        dweight = dweight_part.sum((0, 1)).unsqueeze(1).to(weight.dtype)
        dbias = dbias_part.sum((0, 1)).to(bias.dtype) if bias is not None else None
        return dx, dweight, dbias, None


class _SumOverOrders(torch.autograd.Function):
    """y (batch, K*C, L) -> (batch, L, C): the K orders' tokens put back on the grid and summed."""

    @staticmethod
    def forward(ctx, y: Tensor, walks: Walks) -> Tensor:
        batch, rows, length = y.shape
        out = torch.empty(batch, length, rows // len(walks), dtype=y.dtype, device=y.device)
        with _on_device(y):
            _from_orders(y.contiguous(), walks, None, out)
        ctx.walks, ctx.dtype = walks, y.dtype
        return out

    @staticmethod
    def backward(ctx, dout: Tensor) -> tuple[Tensor | None, ...]:
        batch, length, channels = dout.shape
        dy = torch.empty(batch, len(ctx.walks) * channels, length, dtype=ctx.dtype, device=dout.device)
        with _on_device(dout):
            _into_orders(_channels_contiguous(dout), ctx.walks, None, None, False, dy)
        return dy, None


def ordered_conv1d_silu(x: Tensor, grid: Sequence[int], orders: Sequence[TokenOrder], weight: Tensor,
                        bias: Tensor | None) -> Tensor:
    """SiLU(causal depthwise conv1d_k(order_k(x))) for every order k, stacked: x (batch, L, C) row-major over
    `grid`, weight (K*C, 1, TAPS), bias (K*C,) -> (batch, K*C, L). Equals gathering each order (`TokenOrder.gather`),
    concatenating and `backends.conv1d_silu_torch`, without the copies."""
    return _OrderedConv1dSiLU.apply(_channels_contiguous(x), weight.contiguous(),
                                    bias.contiguous() if bias is not None else None, _walks(grid, orders))


def sum_over_orders(y: Tensor, grid: Sequence[int], orders: Sequence[TokenOrder]) -> Tensor:
    """sum_k order_k.scatter(y[:, k*C:(k+1)*C]): y (batch, K*C, L) -> (batch, L, C), row-major over `grid`."""
    return _SumOverOrders.apply(y, _walks(grid, orders))
