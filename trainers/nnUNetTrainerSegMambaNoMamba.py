"""nnUNetTrainerSegMambaNoMamba (the No-Mamba ablation), for nnU-Net's trainer lookup."""

from nnunet_segmamba.training.segmamba import nnUNetTrainerSegMambaNoMamba

__all__ = ["nnUNetTrainerSegMambaNoMamba"]
