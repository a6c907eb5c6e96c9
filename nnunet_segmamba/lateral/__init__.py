"""Lateral labels (left/right pairs): detected from a dataset, mirrored so they stay true, equivariant inference."""

from nnunet_segmamba.lateral.mirroring import MODE_VARIABLE, MODES, PLANS_KEY, LateralMirroring, detect, requested_mode

__all__ = ["MODE_VARIABLE", "MODES", "PLANS_KEY", "LateralMirroring", "detect", "requested_mode"]
