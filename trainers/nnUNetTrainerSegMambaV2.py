"""nnUNetTrainerSegMambaV2 and its variants, for nnU-Net's trainer lookup."""

from nnunet_segmamba.training.segmamba import (nnUNetTrainerSegMambaV2, nnUNetTrainerSegMambaV2_250epochs,
                                               nnUNetTrainerSegMambaV2RST)

__all__ = ["nnUNetTrainerSegMambaV2", "nnUNetTrainerSegMambaV2_250epochs", "nnUNetTrainerSegMambaV2RST"]
