"""Generated datasets in nnU-Net's raw format."""
