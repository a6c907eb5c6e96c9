"""The plans' operator choice (conv, norm, dropout, nonlinearity) as one value that blocks take."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from dynamic_network_architectures.building_blocks.helper import convert_conv_op_to_dim
from dynamic_network_architectures.building_blocks.residual import StackedResidualBlocks
from dynamic_network_architectures.building_blocks.simple_conv_blocks import ConvDropoutNormReLU, StackedConvBlocks
from torch import nn


@dataclass(frozen=True)
class ConvOps:
    """conv_op (nn.Conv2d / nn.Conv3d) and what follows every conv, as nnU-Net plans name them."""

    conv_op: type[nn.Module]
    conv_bias: bool = False
    norm_op: type[nn.Module] | None = None
    norm_op_kwargs: dict = field(default_factory=dict)
    dropout_op: type[nn.Module] | None = None
    dropout_op_kwargs: dict = field(default_factory=dict)
    nonlin: type[nn.Module] | None = None
    nonlin_kwargs: dict = field(default_factory=dict)

    @property
    def ndim(self) -> int:
        return convert_conv_op_to_dim(self.conv_op)

    def conv_norm_act(self, in_channels: int, out_channels: int, kernel_size: int | Sequence[int],
                      stride: int | Sequence[int] = 1, activation: bool = True) -> ConvDropoutNormReLU:
        """conv -> (dropout) -> norm -> nonlinearity ('same' padding for odd kernels)."""
        return ConvDropoutNormReLU(self.conv_op, in_channels, out_channels, kernel_size, stride, self.conv_bias,
                                   self.norm_op, self.norm_op_kwargs, self.dropout_op, self.dropout_op_kwargs,
                                   self.nonlin if activation else None, self.nonlin_kwargs)

    def stacked_convs(self, n: int, in_channels: int, out_channels: int, kernel_size: int | Sequence[int],
                      stride: int | Sequence[int] = 1) -> StackedConvBlocks:
        """n x conv_norm_act, the first with `stride` (nnU-Net's encoder/decoder stage)."""
        return StackedConvBlocks(n, self.conv_op, in_channels, out_channels, kernel_size, stride, self.conv_bias,
                                 self.norm_op, self.norm_op_kwargs, self.dropout_op, self.dropout_op_kwargs,
                                 self.nonlin, self.nonlin_kwargs)

    def residual_blocks(self, n: int, in_channels: int, out_channels: int, kernel_size: int | Sequence[int],
                        stride: int | Sequence[int] = 1) -> StackedResidualBlocks:
        """n residual blocks (conv-norm-act, conv-norm, + skip, act: BasicBlockD), the first with `stride`."""
        return StackedResidualBlocks(n, self.conv_op, in_channels, out_channels, kernel_size, stride, self.conv_bias,
                                     self.norm_op, self.norm_op_kwargs, self.dropout_op, self.dropout_op_kwargs,
                                     self.nonlin, self.nonlin_kwargs)

    def as_encoder_attributes(self) -> dict:
        """The attribute names dynamic-network-architectures' decoders read from an encoder."""
        return {name: getattr(self, name) for name in self.__dataclass_fields__}
