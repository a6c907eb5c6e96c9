"""MambaClinix's HGCN block and its recursive gated convolution (HorNet's g^n Conv, Rao et al. 2022)."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from dynamic_network_architectures.building_blocks.regularization import DropPath
from torch import Tensor, nn

from nnunet_segmamba.blocks.conv import ConvOps


class _ChannelLayerNormFunction(torch.autograd.Function):
    """`ChannelLayerNorm`'s forward, and a backward that recomputes the normalised input from x and the per-voxel
    mean and 1/std: it saves x (B, C, *spatial) in its own dtype and two (B, 1, *spatial) fp32 statistics, where
    autograd would keep three fp32 copies of the feature map. With g = dy * weight and x^ the normalised input:

        dx = rstd * (g - mean_C(g) - x^ * mean_C(g * x^)),   dweight = sum_(B, spatial) dy * x^,   dbias = sum dy
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
        x32 = x.float()
        if x32.is_cuda:  # one fused kernel
            var, mean = torch.var_mean(x32, dim=1, keepdim=True, correction=0)
        else:  # torch's CPU var_mean across channels: 35 ms at 32 x 56 x 64 x 56; these two passes: 3 ms
            mean = x32.mean(1, keepdim=True)
            var = (x32 - mean).square_().mean(1, keepdim=True)
        rstd = torch.rsqrt(var + eps)
        shape = (1, -1) + (1,) * (x.ndim - 2)
        ctx.save_for_backward(x, weight, mean, rstd)
        return ((x32 - mean) * rstd * weight.view(shape) + bias.view(shape)).to(x.dtype)

    @staticmethod
    def backward(ctx, dy: Tensor) -> tuple[Tensor, Tensor, Tensor, None]:
        x, weight, mean, rstd = ctx.saved_tensors
        shape = (1, -1) + (1,) * (x.ndim - 2)
        normalised, dy32 = (x.float() - mean) * rstd, dy.float()
        g = dy32 * weight.view(shape)
        dx = rstd * (g - g.mean(1, keepdim=True) - normalised * (g * normalised).mean(1, keepdim=True))
        over = [0, *range(2, x.ndim)]
        return dx.to(x.dtype), (dy32 * normalised).sum(over).to(weight.dtype), dy32.sum(over).to(weight.dtype), None


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channels of (B, C, *spatial) feature maps -> same shape and dtype:

        y = (x - mean_C(x)) / sqrt(var_C(x) + eps) * weight + bias

    Statistics in fp32 (an fp16 variance overflows; dynamic-network-architectures' LayerNormNd computes in
    the input dtype), one fused var_mean on CUDA (two passes on the CPU), no channels-last copy (timing:
    BENCHMARKS.md, "Tried and rejected"); the backward keeps x and the per-voxel statistics only
    (`_ChannelLayerNormFunction`).
    """

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return _ChannelLayerNormFunction.apply(x, self.weight, self.bias, self.eps)


def gate_widths(channels: int, order: int) -> list[int]:
    """Channel widths C_k = C / 2^(n-1-k), k = 0..n-1, of the n gates (floored, at least 1; C_(n-1) = C)."""
    if order < 1:
        raise ValueError(f"The order of a recursive gated convolution must be at least 1, got {order}.")
    return [max(1, channels // 2 ** (order - 1 - k)) for k in range(order)]


class RecursiveGatedConv(nn.Module):
    """g^n Conv of order n: high-order spatial interactions by repeated element-wise gating.

        p_0, q  = split(proj_in(x))                 # widths C_0 and C_0 + ... + C_(n-1)
        q_0, ..., q_(n-1) = split(dwconv(q))        # depthwise conv with the stage's kernel
        p_1     = p_0 * q_0
        p_(k+1) = pw_k(p_k) * q_k,  k = 1 .. n-1    # pw_k: 1^3 conv C_(k-1) -> C_k
        out     = proj_out(p_n)

    C_k = C / 2^(n-1-k) (see `gate_widths`); `*` element-wise, so without biases the output is a
    homogeneous polynomial of degree n + 1 in x. x: (B, C, *spatial) -> same shape.
    """

    def __init__(self, channels: int, order: int, kernel_size: Sequence[int], conv_op: type[nn.Module]) -> None:
        super().__init__()
        self.order = order
        self.widths = gate_widths(channels, order)
        gates = sum(self.widths)
        self.proj_in = conv_op(channels, self.widths[0] + gates, 1)
        self.dwconv = conv_op(gates, gates, list(kernel_size), padding=[k // 2 for k in kernel_size], groups=gates)
        self.pointwise = nn.ModuleList(conv_op(a, b, 1) for a, b in zip(self.widths[:-1], self.widths[1:]))
        self.proj_out = conv_op(self.widths[-1], channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        p, q = self.proj_in(x).split([self.widths[0], sum(self.widths)], dim=1)
        gates = self.dwconv(q).split(self.widths, dim=1)
        p = p * gates[0]
        for pointwise, gate in zip(self.pointwise, gates[1:]):
            p = pointwise(p) * gate
        return self.proj_out(p)

    def compute_conv_feature_map_size(self, input_size: Sequence[int]) -> np.int64:
        """proj_in, dwconv, the n products, the n-1 pointwise convs and proj_out."""
        channels = self.widths[0] + 3 * sum(self.widths) + sum(self.widths[1:]) + self.proj_out.out_channels
        return np.int64(channels * np.prod(input_size, dtype=np.int64))


class HGCNBlock(nn.Module):
    """HGCN block of MambaClinix (x: (B, C, *spatial) -> same shape):

        y   = conv_1(x)                                      # 1^3 conv, C -> C/2
        y   = y + DropPath(gamma * g^nConv(LN(y)))           # gamma: per-channel layer scale
        out = x + norm(conv_k(act(norm(conv_k(LN(y))))))     # C/2 -> C -> C, the stage's kernel
    """

    def __init__(self, channels: int, kernel_size: Sequence[int], order: int, ops: ConvOps,
                 layer_scale_init: float = 1e-6, drop_path: float = 0.0) -> None:
        super().__init__()
        hidden = max(1, channels // 2)
        self.reduce = ops.conv_op(channels, hidden, 1)
        self.norm_gconv = ChannelLayerNorm(hidden)
        self.gconv = RecursiveGatedConv(hidden, order, kernel_size, ops.conv_op)
        self.layer_scale = nn.Parameter(torch.full((hidden,) + (1,) * ops.ndim, float(layer_scale_init)))
        self.drop_path = DropPath(drop_path)
        self.norm_convs = ChannelLayerNorm(hidden)
        self.expand = ops.conv_norm_act(hidden, channels, kernel_size)
        self.out = ops.conv_norm_act(channels, channels, kernel_size, activation=False)

    def forward(self, x: Tensor) -> Tensor:
        y = self.reduce(x)
        y = y + self.drop_path(self.layer_scale * self.gconv(self.norm_gconv(y)))
        return x + self.out(self.expand(self.norm_convs(y)))

    def compute_conv_feature_map_size(self, input_size: Sequence[int]) -> np.int64:
        """The reduction, two norms, the scaled branch and its sum, g^nConv, both kxk convs and the skip sum."""
        hidden, channels = self.reduce.out_channels, self.out.output_channels
        voxels = np.prod(input_size, dtype=np.int64)
        return (self.gconv.compute_conv_feature_map_size(input_size)
                + self.expand.compute_conv_feature_map_size(input_size)
                + self.out.compute_conv_feature_map_size(input_size) + np.int64((5 * hidden + channels) * voxels))
