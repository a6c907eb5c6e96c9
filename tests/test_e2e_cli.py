"""Our trainers through nnU-Net's stock commands, each in a fresh process with only the README's set-up.

synth -> nnUNetv2_plan_and_preprocess -> nnUNetv2_train (one short epoch) -> nnUNetv2_predict ->
nnUNetv2_evaluate_folder, on a tiny generated dataset, on the CPU.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nnunet_segmamba.datasets.raw import write_raw_dataset
from nnunet_segmamba.datasets.synthetic import PRESETS
from nnunet_segmamba.training.mambaclinix import nnUNetTrainerMambaClinix, nnUNetTrainerMambaClinixRST
from nnunet_segmamba.training.segmamba import nnUNetTrainerSegMamba, nnUNetTrainerSegMambaV2
from nnunet_segmamba.training.variants import write_variants_module

pytestmark = pytest.mark.e2e

DATASET = 911
SHORT_RUN = {"num_epochs": 1, "num_iterations_per_epoch": 2, "num_val_iterations_per_epoch": 1}
TRAINERS = {"nnUNetTrainerSegMambaV2_ci": nnUNetTrainerSegMambaV2, "nnUNetTrainerSegMamba_ci": nnUNetTrainerSegMamba,
            "nnUNetTrainerMambaClinix_ci": nnUNetTrainerMambaClinix,
            "nnUNetTrainerMambaClinixRST_ci": nnUNetTrainerMambaClinixRST}
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("nnunet")
    folders = {name: root / name for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    for folder in folders.values():
        folder.mkdir()
    write_raw_dataset(folders["nnUNet_raw"], DATASET, "E2E", PRESETS["tiny"], n_train=6, n_test=2, seed=1)
    # short-budget subclasses of our trainers, in a folder of their own (as a user's custom trainers would be)
    write_variants_module(root / "ci_trainers", "ci_trainers",
                          {name: (base, SHORT_RUN) for name, base in TRAINERS.items()})
    env = {k: v for k, v in os.environ.items() if not k.startswith("nnUNet_")}
    env.update({k: str(v) for k, v in folders.items()})
    env.update(PATH=f"{BIN}{os.pathsep}{env['PATH']}", nnUNet_def_n_proc="1", OMP_NUM_THREADS="2")
    return root, env


def stock(workspace, command: str, **extra_env) -> subprocess.CompletedProcess:
    """`command` in bash after the README's set-up line, plus the folder of the short-run variants."""
    root, env = workspace
    setup = f'eval "$(nnunet-segmamba env)" && export nnUNet_extTrainer="$nnUNet_extTrainer:{root / "ci_trainers"}"'
    result = subprocess.run(["bash", "-c", f"{setup} && {command}"], capture_output=True, text=True,
                            env={**env, **extra_env}, timeout=900)
    assert result.returncode == 0, f"{command}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def preprocessed(workspace):
    stock(workspace, f"nnUNetv2_plan_and_preprocess -d {DATASET} -c 3d_fullres -np 1 --verify_dataset_integrity")
    return workspace


@pytest.mark.parametrize("trainer", sorted(TRAINERS))
def test_train_predict_evaluate(preprocessed, trainer):
    root, env = preprocessed
    raw = Path(env["nnUNet_raw"]) / f"Dataset{DATASET}_E2E"
    model = Path(env["nnUNet_results"]) / f"Dataset{DATASET}_E2E" / f"{trainer}__nnUNetPlans__3d_fullres"

    stock(preprocessed, f"nnUNetv2_train {DATASET} 3d_fullres 0 -tr {trainer} -device cpu", nnUNet_n_proc_DA="0")
    fold = model / "fold_0"
    assert (fold / "checkpoint_final.pth").is_file()
    log = next(fold.glob("training_log_*.txt")).read_text()
    assert "Mamba scan backend: torch" in log and "Mixed precision: off" in log
    validation = json.loads((fold / "validation" / "summary.json").read_text())
    assert "foreground_mean" in validation

    predictions = root / f"predictions_{trainer}"
    stock(preprocessed, f"nnUNetv2_predict -i {raw / 'imagesTs'} -o {predictions} -d {DATASET} -c 3d_fullres "
                        f"-tr {trainer} -f 0 -device cpu -npp 1 -nps 1")
    assert sorted(p.name for p in predictions.glob("*.nii.gz")) == ["E2E_006.nii.gz", "E2E_007.nii.gz"]

    stock(preprocessed, f"nnUNetv2_evaluate_folder {raw / 'labelsTs'} {predictions} -djfile {raw / 'dataset.json'} "
                        f"-pfile {model / 'plans.json'} -np 1")
    summary = json.loads((predictions / "summary.json").read_text())
    assert 0.0 <= summary["foreground_mean"]["Dice"] <= 1.0
    assert set(summary["mean"]) == {"1", "2", "3", "4"}


def test_five_fold_cross_validation_read_by_find_best_configuration(preprocessed):
    """A full cross-validation of one of our trainers, as nnU-Net's own model selection reads it."""
    root, env = preprocessed
    trainer = "nnUNetTrainerSegMambaV2_ci"
    model = Path(env["nnUNet_results"]) / f"Dataset{DATASET}_E2E" / f"{trainer}__nnUNetPlans__3d_fullres"
    for fold in range(5):
        if not (model / f"fold_{fold}" / "checkpoint_final.pth").is_file():  # fold 0 may come from the test above
            stock(preprocessed, f"nnUNetv2_train {DATASET} 3d_fullres {fold} -tr {trainer} -device cpu",
                  nnUNet_n_proc_DA="0")
    stock(preprocessed, f"nnUNetv2_find_best_configuration {DATASET} -c 3d_fullres -tr {trainer} "
                        f"-f 0 1 2 3 4 -np 1")
    information = json.loads((model.parent / "inference_information.json").read_text())
    best = information["best_model_or_ensemble"]["selected_model_or_models"]
    assert [m["trainer"] for m in best] == [trainer]
    assert (model / "crossval_results_folds_0_1_2_3_4" / "summary.json").is_file()
    assert "nnUNetv2_predict" in (model.parent / "inference_instructions.txt").read_text()
