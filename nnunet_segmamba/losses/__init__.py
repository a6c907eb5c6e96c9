"""Losses for nnU-Net trainers."""

from nnunet_segmamba.losses.region_tversky import RegionTverskyLoss, region_tversky_loss

__all__ = ["RegionTverskyLoss", "region_tversky_loss"]
