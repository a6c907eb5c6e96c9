"""The folder that nnUNet_extTrainer points at (`nnunet-segmamba env` prints the line).

nnU-Net imports every module here by its bare name and looks for the requested trainer class, so each
module only re-exports classes defined in `nnunet_segmamba.training`.
"""
