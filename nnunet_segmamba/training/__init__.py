"""nnU-Net trainer classes (the thin modules in `nnunet_segmamba.trainers` re-export them for nnU-Net)."""
