"""Mamba-based 3D segmentation networks (SegMamba-V2, SegMamba, MambaClinix) as nnU-Net v2 trainers."""

__version__ = "0.1.0"
