"""nnUNetTrainerMambaClinixRST (region-specific Tversky loss), for nnU-Net's trainer lookup."""

from nnunet_segmamba.training.mambaclinix import nnUNetTrainerMambaClinixRST

__all__ = ["nnUNetTrainerMambaClinixRST"]
