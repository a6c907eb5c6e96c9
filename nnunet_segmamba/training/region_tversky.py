"""The region-specific Tversky loss for any nnU-Net trainer: (Dice + CE) + 0.8 * RST, deep-supervised."""

from __future__ import annotations

from typing import ClassVar

from torch import nn

from nnunet_segmamba.losses.region_tversky import REGION_SIZE, WeightedSumLoss, region_tversky_loss


class RegionTverskyLossMixin:
    """Put first in the bases of an nnU-Net trainer: its loss becomes nnU-Net's Dice + CE (with nnU-Net's
    deep-supervision weights) plus `region_tversky_weight` times the region-specific Tversky loss, on
    every deep-supervision output with the same weights, its region grid derived from the patch size.

        class nnUNetTrainerXRST(RegionTverskyLossMixin, nnUNetTrainerX): ...

    Not defined for region-based labels (BraTS-style overlapping regions, sigmoid outputs): raises ValueError.
    """

    region_tversky_weight: ClassVar[float] = 0.8
    region_size: ClassVar[int] = REGION_SIZE

    def _build_loss(self) -> nn.Module:
        if self.label_manager.has_regions:
            raise ValueError(
                f"{type(self).__name__} trains with the region-specific Tversky loss, which needs mutually exclusive "
                f"labels (softmax); this dataset uses region-based labels (dataset.json 'labels' given as lists of "
                f"label values, with 'regions_class_order'). Use a trainer without RST for it, e.g. nnUNetTrainerMambaClinix.")
        dice_ce = super()._build_loss()
        scales = self._get_deep_supervision_scales()  # None without deep supervision
        # with deep supervision nnU-Net wrapped Dice + CE in a DeepSupervisionWrapper: RST reuses its weights
        weights = None if scales is None else dice_ce.weight_factors
        rst = region_tversky_loss(self.configuration_manager.patch_size, scales, weights,
                                  self.label_manager.ignore_label, self.region_size)
        return WeightedSumLoss([dice_ce, rst], [1.0, self.region_tversky_weight])
