"""nnU-Net's three data folders for a test."""

from pathlib import Path

NNUNET_FOLDERS = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")


def nnunet_folders(root: Path) -> dict[str, Path]:
    """root/nnUNet_raw, root/nnUNet_preprocessed and root/nnUNet_results, created, by variable name."""
    folders = {name: root / name for name in NNUNET_FOLDERS}
    for folder in folders.values():
        folder.mkdir()
    return folders
