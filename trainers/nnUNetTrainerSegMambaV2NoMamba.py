"""nnUNetTrainerSegMambaV2NoMamba (the No-Mamba ablation), for nnU-Net's trainer lookup."""

from nnunet_segmamba.training.segmamba import nnUNetTrainerSegMambaV2NoMamba

__all__ = ["nnUNetTrainerSegMambaV2NoMamba"]
