"""nnU-Net's three data folders for a test; tiny generated datasets preprocessed in them."""

import os
import subprocess
import sys
from pathlib import Path

from nnunet_segmamba.datasets.raw import write_raw_dataset
from nnunet_segmamba.datasets.tasks import task_from_preset

NNUNET_FOLDERS = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")


def nnunet_folders(root: Path) -> dict[str, Path]:
    """root/nnUNet_raw, root/nnUNet_preprocessed and root/nnUNet_results, created, by variable name."""
    folders = {name: root / name for name in NNUNET_FOLDERS}
    for folder in folders.values():
        folder.mkdir()
    return folders


def preprocessed_tiny_datasets(root: Path, datasets: dict[int, str]) -> dict[str, str]:
    """The datasets ({id: name}, 5 training cases of the `tiny` preset each: enough for nnU-Net's 5-fold split)
    written and preprocessed (3d_fullres) in nnU-Net folders under `root`; the environment for stock commands
    on them (one process and one thread each, no torch.compile)."""
    folders = nnunet_folders(root)
    for dataset_id, name in datasets.items():
        write_raw_dataset(folders["nnUNet_raw"], dataset_id, name, task_from_preset("tiny"), n_train=5, n_test=0,
                          seed=dataset_id)
    env = {k: v for k, v in os.environ.items() if not k.startswith("nnUNet_")}
    env.update({k: str(v) for k, v in folders.items()}, PATH=f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}",
               OMP_NUM_THREADS="1", nnUNet_def_n_proc="1", nnUNet_compile="f")
    subprocess.run(["nnUNetv2_plan_and_preprocess", "-d", *map(str, datasets), "-c", "3d_fullres", "-np", "1"],
                   env=env, check=True, capture_output=True, timeout=900)
    return env
