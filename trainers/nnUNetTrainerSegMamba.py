"""nnUNetTrainerSegMamba and its variants, for nnU-Net's trainer lookup."""

from nnunet_segmamba.training.segmamba import nnUNetTrainerSegMamba, nnUNetTrainerSegMamba_250epochs

__all__ = ["nnUNetTrainerSegMamba", "nnUNetTrainerSegMamba_250epochs"]
