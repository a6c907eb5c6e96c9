"""nnUNetTrainerMambaClinix, for nnU-Net's trainer lookup."""

from nnunet_segmamba.training.mambaclinix import nnUNetTrainerMambaClinix

__all__ = ["nnUNetTrainerMambaClinix"]
