"""nnU-Net's mirroring augmentation with the paired labels swapped on left-right flips."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from batchgeneratorsv2.transforms.spatial.mirroring import MirrorTransform


def swap_pairs(tensor: torch.Tensor, pairs: Sequence[tuple[int, int]]) -> torch.Tensor:
    """`tensor` with the values of each pair (a, b) exchanged (other values, -1 padding included, kept)."""
    masks = [(tensor == a, tensor == b) for a, b in pairs]
    swapped = tensor.clone()
    for (a, b), (is_a, is_b) in zip(pairs, masks):
        swapped[is_a] = b
        swapped[is_b] = a
    return swapped


class LateralMirrorTransform(MirrorTransform):
    """batchgeneratorsv2's MirrorTransform (same random axes, same flips), and a sample flipped along
    `left_right_axis` gets the labels of each of `label_pairs` swapped in every segmentation channel.

    It takes MirrorTransform's place in nnU-Net's pipeline: before the conversion to regions and the
    deep-supervision downsampling, so both see the swapped labels."""

    def __init__(self, allowed_axes: Sequence[int], left_right_axis: int, label_pairs: Sequence[tuple[int, int]]):
        super().__init__(tuple(allowed_axes))
        self.left_right_axis = left_right_axis
        self.label_pairs = tuple(label_pairs)

    def _apply_to_segmentation(self, segmentation: torch.Tensor, **params) -> torch.Tensor:
        flipped = super()._apply_to_segmentation(segmentation, **params)
        if self.left_right_axis in params["axes"]:
            return swap_pairs(flipped, self.label_pairs)
        return flipped
