"""MambaClinix trainers: nnU-Net's Dice + CE, or with the region-specific Tversky loss added (RST), and the
No-Mamba ablation."""

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


class nnUNetTrainerMambaClinixNoMamba(nnUNetTrainerMambaClinix):
    """MambaClinix with every Mamba layer an identity (its norms, linear layer and residual, the HGCN blocks and
    the decoder unchanged): the No-Mamba ablation of "nnU-Net Revisited" (MICCAI 2024), to measure what the
    Mamba layers add."""

    network_options = {"mamba": False}
