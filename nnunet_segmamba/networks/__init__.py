"""Networks built from nnU-Net plans."""
