"""Networks whose predictions are left-right equivariant: the mirrored pass with its paired channels swapped back.

In inference (eval mode, one output, as nnU-Net's predictor and final validation run a network)

    f'(x) = (f(x) + S F f(F x)) / 2,    F: flip along the left-right axis,  S: swap of the paired output channels,

so f'(F x) = S F f'(x) exactly, for any weights. This is nnU-Net's test-time mirroring along the left-right axis
with the swap (that axis then leaves the predictor's mirror axes); the predictor's mirroring along the other
axes averages over these. Training (and nnU-Net's online validation, with deep-supervision outputs) runs f alone.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
from torch import nn


class LeftRightEquivariant:
    """Mixin for an nn.Module class (put first): adds the mirrored pass in inference. Set `flip_dim` (a dimension
    of the network's input) and `channel_order` (the output channels' permutation S) on the instance."""

    flip_dim: int
    channel_order: list[int]

    def forward(self, x: torch.Tensor):
        prediction = super().forward(x)
        if self.training or not isinstance(prediction, torch.Tensor):
            return prediction
        mirrored = super().forward(torch.flip(x, (self.flip_dim,)))
        return (prediction + torch.flip(mirrored, (self.flip_dim,))[:, self.channel_order]) / 2


@functools.cache
def _equivariant_class(network_class: type[nn.Module]) -> type[nn.Module]:
    return type(f"LeftRightEquivariant{network_class.__name__}", (LeftRightEquivariant, network_class),
                {"__module__": __name__, "__doc__": f"{network_class.__name__} made left-right equivariant."})


def make_left_right_equivariant(network: nn.Module, flip_dim: int, channels: int,
                                channel_pairs: Sequence[tuple[int, int]]) -> nn.Module:
    """Turn `network` (in place) into its left-right equivariant version: its class becomes a subclass with the
    mirrored pass; parameters, submodules and state dict stay as they are (checkpoints load both ways)."""
    order = list(range(channels))
    for a, b in channel_pairs:
        order[a], order[b] = b, a
    if not isinstance(network, LeftRightEquivariant):
        network.__class__ = _equivariant_class(type(network))
    network.flip_dim, network.channel_order = flip_dim, order
    return network
