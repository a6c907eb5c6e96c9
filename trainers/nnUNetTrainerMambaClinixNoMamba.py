"""nnUNetTrainerMambaClinixNoMamba (the No-Mamba ablation), for nnU-Net's trainer lookup."""

from nnunet_segmamba.training.mambaclinix import nnUNetTrainerMambaClinixNoMamba

__all__ = ["nnUNetTrainerMambaClinixNoMamba"]
