"""nnUNetTrainerLateral (nnU-Net's trainer with left/right-aware mirroring), for nnU-Net's trainer lookup."""

from nnunet_segmamba.training.lateral import nnUNetTrainerLateral

__all__ = ["nnUNetTrainerLateral"]
