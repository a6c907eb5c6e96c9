"""MambaClinix trainers: nnU-Net's Dice + CE, or with the region-specific Tversky loss added (RST)."""

from __future__ import annotations

from nnunet_segmamba.networks.mambaclinix import MambaClinix
from nnunet_segmamba.training.base import nnUNetTrainerMambaBase
from nnunet_segmamba.training.lateral import LateralMirroringMixin
from nnunet_segmamba.training.region_tversky import RegionTverskyLossMixin


class nnUNetTrainerMambaClinix(LateralMirroringMixin, nnUNetTrainerMambaBase):
    """MambaClinix: residual encoder with HGCN blocks on the shallow stages and Mamba layers on the deep ones."""

    network_class = MambaClinix


class nnUNetTrainerMambaClinixRST(RegionTverskyLossMixin, nnUNetTrainerMambaClinix):
    """MambaClinix trained with (Dice + CE) + 0.8 * region-specific Tversky loss, as in the paper."""
