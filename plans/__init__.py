"""Mamba-aware experiment planners (`planners`) and the memory model they use (`memory`, fitted to the
measurements in `calibration.json`). Run through `nnunet-segmamba plan`."""
