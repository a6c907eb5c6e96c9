"""Trainers of the SegMamba family (nnU-Net's Dice + CE loss, SGD and poly schedule, left/right-aware mirroring),
and their No-Mamba ablations."""

from __future__ import annotations

from nnunet_segmamba.networks.segmamba import SegMamba, SegMambaV2
from nnunet_segmamba.training.base import nnUNetTrainerMambaBase
from nnunet_segmamba.training.lateral import LateralMirroringMixin
from nnunet_segmamba.training.region_tversky import RegionTverskyLossMixin
from nnunet_segmamba.training.variants import trainer_variant


class nnUNetTrainerSegMambaV2(LateralMirroringMixin, nnUNetTrainerMambaBase):
    """SegMamba-V2: HSD, tri-orientated spatial Mamba from 1/8 resolution, GSC, FUE."""

    network_class = SegMambaV2


class nnUNetTrainerSegMamba(LateralMirroringMixin, nnUNetTrainerMambaBase):
    """SegMamba: tri-orientated Mamba (ToM) from 1/4 resolution, GSC, FUE."""

    network_class = SegMamba


class nnUNetTrainerSegMambaV2NoMamba(nnUNetTrainerSegMambaV2):
    """SegMamba-V2 with every Mamba mixer an identity (GSC, norms, MLP, residuals, HSD, FUE, decoder unchanged):
    the No-Mamba ablation that "nnU-Net Revisited" (Isensee et al., MICCAI 2024) ran on U-Mamba, to measure
    what the Mamba layers add."""

    network_options = {"mamba": False}


class nnUNetTrainerSegMambaNoMamba(nnUNetTrainerSegMamba):
    """SegMamba with every Mamba mixer an identity (GSC, norms, MLP, residuals, FUE, decoder unchanged): the
    No-Mamba ablation of "nnU-Net Revisited" (MICCAI 2024), to measure what the Mamba layers add."""

    network_options = {"mamba": False}


nnUNetTrainerSegMambaV2_250epochs = trainer_variant(
    nnUNetTrainerSegMambaV2, "nnUNetTrainerSegMambaV2_250epochs", __name__, num_epochs=250)
nnUNetTrainerSegMamba_250epochs = trainer_variant(
    nnUNetTrainerSegMamba, "nnUNetTrainerSegMamba_250epochs", __name__, num_epochs=250)


class nnUNetTrainerSegMambaV2RST(RegionTverskyLossMixin, nnUNetTrainerSegMambaV2):
    """SegMamba-V2 trained with (Dice + CE) + 0.8 * region-specific Tversky loss."""
