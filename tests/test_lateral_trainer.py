"""Trainers with lateral mirroring on nnU-Net's real preprocessing: what they detect, log, store and feed the
network, and that a dataset without pairs trains and predicts exactly as nnU-Net's own trainer."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from batchgenerators.utilities.file_and_folder_operations import load_json
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_segmamba.datasets.raw import write_raw_dataset
from nnunet_segmamba.datasets.synthetic import PRESETS
from nnunet_segmamba.lateral.axis import read_case_properties, training_axis
from nnunet_segmamba.lateral.equivariant import LeftRightEquivariant
from nnunet_segmamba.lateral.transforms import LateralMirrorTransform
from nnunet_segmamba.training.lateral import nnUNetTrainerLateral
from nnunet_segmamba.training.segmamba import nnUNetTrainerSegMambaV2
from tests.folders import nnunet_folders

SYNTH, SITK = 921, 922
BIN = Path(sys.executable).parent


def write_sitk_dataset(raw: Path) -> None:
    """Five cases written by SimpleITK whose index axis j runs left-right and whose thick slices (3 mm) run along
    i: nnU-Net's planner then transposes (largest spacing first). Intensity = physical x; labels by side."""
    folder = raw / f"Dataset{SITK}_Sitk"
    for sub in ("imagesTr", "labelsTr"):
        (folder / sub).mkdir(parents=True)
    direction, spacing, size = np.eye(3)[[1, 0, 2]], (3.0, 0.7, 0.7), (6, 16, 12)
    index = np.stack(np.meshgrid(*(np.arange(n) for n in size), indexing="ij"), -1)
    x = (index * np.asarray(spacing)) @ direction[0]
    label = np.where(x < x.mean() - 2, 1, np.where(x > x.mean() + 2, 2, 0))  # 1: the patient's right in LPS
    for case in range(5):
        rng = np.random.default_rng(case)
        for array, sub, name in ((x + rng.normal(0, 0.01, x.shape), "imagesTr", f"c{case}_0000.mha"),
                                 (label, "labelsTr", f"c{case}.mha")):
            dtype = np.float32 if sub == "imagesTr" else np.uint8
            image = sitk.GetImageFromArray(array.transpose(2, 1, 0).astype(dtype))
            image.SetSpacing(spacing)
            image.SetDirection(tuple(direction.ravel()))
            sitk.WriteImage(image, str(folder / sub / name))
    (folder / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "x"}, "labels": {"background": 0, "region_right": 1, "region_left": 2},
        "numTraining": 5, "file_ending": ".mha"}))


@pytest.fixture(scope="module")
def nnunet(tmp_path_factory):
    root = tmp_path_factory.mktemp("lateral")
    folders = nnunet_folders(root)
    write_raw_dataset(folders["nnUNet_raw"], SYNTH, "Synth", PRESETS["tiny"], n_train=5, n_test=0, seed=2)
    write_sitk_dataset(folders["nnUNet_raw"])
    env = {**os.environ, **{k: str(v) for k, v in folders.items()}, "nnUNet_def_n_proc": "1"}
    subprocess.run([str(BIN / "nnUNetv2_plan_and_preprocess"), "-d", str(SYNTH), str(SITK), "-c", "3d_fullres",
                    "-np", "1"], env=env, check=True, capture_output=True, timeout=600)
    return folders


def make_trainer(cls, nnunet, monkeypatch, dataset: int, **dataset_json_changes):
    for name, folder in nnunet.items():
        monkeypatch.setenv(name, str(folder))
    monkeypatch.setenv("nnUNet_n_proc_DA", "0")
    folder = next(nnunet["nnUNet_preprocessed"].glob(f"Dataset{dataset}_*"))
    plans = {**load_json(str(folder / "nnUNetPlans.json")), "continue_training": False}
    dataset_json = {**load_json(str(folder / "dataset.json")), **dataset_json_changes}
    return cls(plans, "3d_fullres", 0, dataset_json, torch.device("cpu"))


def log_of(trainer) -> str:
    with open(trainer.log_file) as log:
        return log.read()


def test_axis_after_nnunets_transpose_is_the_one_the_data_varies_along(nnunet, monkeypatch):
    trainer = make_trainer(nnUNetTrainerLateral, nnunet, monkeypatch, SITK)
    assert trainer.plans_manager.transpose_forward == [2, 0, 1]  # the planner moved the thick axis first
    axis = training_axis(read_case_properties(trainer.preprocessed_dataset_folder),
                         trainer.plans_manager.transpose_forward)
    trainer.initialize()
    assert "lateral pairs: 2<->1 on axis 2 (exclude)" in log_of(trainer)
    data = np.asarray(trainer.dataset_class(trainer.preprocessed_dataset_folder).load_case("c0")[0][0])
    steps = [np.abs(np.diff(data, axis=a)) for a in range(3)]  # z-scored physical x, plus a little noise
    assert axis == 2 and steps[axis].min() > 0.1 and all(steps[a].max() < 0.1 for a in range(3) if a != axis)


def test_swap_mode_logs_stores_swaps_and_makes_the_network_equivariant(nnunet, monkeypatch):
    monkeypatch.setenv("NNUNET_SEGMAMBA_LATERAL", "swap")
    trainer = make_trainer(nnUNetTrainerSegMambaV2, nnunet, monkeypatch, SYNTH)
    trainer.initialize()
    assert "lateral pairs: 1<->2 on axis 2 (swap)" in log_of(trainer)
    assert trainer.plans_manager.plans["lateral_mirroring"] == {"mode": "swap", "axis": 2, "label_pairs": [[1, 2]],
                                                                "channel_pairs": [[1, 2]]}
    assert isinstance(trainer.network, LeftRightEquivariant)
    train, _ = trainer.get_dataloaders()
    mirror = [t for t in train.data_loader.transforms.transforms if "Mirror" in type(t).__name__]
    assert len(mirror) == 1 and isinstance(mirror[0], LateralMirrorTransform) and mirror[0].allowed_axes == (0, 1, 2)
    assert trainer.inference_allowed_mirroring_axes == (0, 1)  # the network mirrors along axis 2 itself
    # what nnUNetv2_predict builds from the model folder's plans.json: the same equivariant network
    rebuilt = nnUNetTrainerSegMambaV2.build_network_architecture(trainer.plans_manager, trainer.configuration_manager,
                                                                 1, 5, False)
    assert isinstance(rebuilt, LeftRightEquivariant)
    assert rebuilt.flip_dim == 4 and rebuilt.channel_order == [0, 2, 1, 3, 4]


def test_exclude_mode_the_default_drops_the_axis_from_training_and_test_mirroring(nnunet, monkeypatch):
    monkeypatch.delenv("NNUNET_SEGMAMBA_LATERAL", raising=False)
    trainer = make_trainer(nnUNetTrainerLateral, nnunet, monkeypatch, SYNTH)
    trainer.initialize()
    assert "lateral pairs: 1<->2 on axis 2 (exclude); mode from NNUNET_SEGMAMBA_LATERAL" in log_of(trainer)
    assert not isinstance(trainer.network, LeftRightEquivariant)
    train, _ = trainer.get_dataloaders()
    mirror = [t for t in train.data_loader.transforms.transforms if "Mirror" in type(t).__name__]
    assert [type(m).__name__ for m in mirror] == ["MirrorTransform"] and mirror[0].allowed_axes == (0, 1)
    assert trainer.inference_allowed_mirroring_axes == (0, 1)


def test_folds_of_one_model_must_mirror_alike(nnunet, monkeypatch):
    monkeypatch.setenv("NNUNET_SEGMAMBA_LATERAL", "swap")
    trainer = make_trainer(nnUNetTrainerLateral, nnunet, monkeypatch, SYNTH)
    os.makedirs(trainer.output_folder_base, exist_ok=True)
    stored = {**trainer.plans_manager.plans, "lateral_mirroring": {"mode": "exclude", "axis": 2,
                                                                   "label_pairs": [[1, 2]], "channel_pairs": []}}
    Path(trainer.output_folder_base, "plans.json").write_text(json.dumps(stored))
    try:
        with pytest.raises(ValueError, match="from an earlier fold.*NNUNET_SEGMAMBA_LATERAL=exclude"):
            trainer.initialize()
    finally:
        os.remove(Path(trainer.output_folder_base, "plans.json"))


def seeded(trainer_class, nnunet, monkeypatch, batches: int = 1, **dataset_json_changes):
    """A trainer initialised and its first training batches drawn, at fixed seeds."""
    trainer = make_trainer(trainer_class, nnunet, monkeypatch, SYNTH, **dataset_json_changes)
    torch.manual_seed(0), np.random.seed(0)
    trainer.initialize()
    torch.manual_seed(1), np.random.seed(1)
    train, validation = trainer.get_dataloaders()
    return trainer, [next(train) for _ in range(batches)]


@pytest.mark.parametrize("changes", [{"labels": {"background": 0, "blob_a": 1, "blob_b": 2, "tube": 3, "speck": 4}},
                                     {"lateral_pairs": []}], ids=["no_pair_names", "declared_none"])
def test_without_pairs_batches_and_predictions_are_nnunets_bit_for_bit(nnunet, monkeypatch, changes):
    monkeypatch.setenv("NNUNET_SEGMAMBA_LATERAL", "swap")  # the mode that changes most: none of it may show
    ours, (our_batch,) = seeded(nnUNetTrainerLateral, nnunet, monkeypatch, **changes)
    theirs, (their_batch,) = seeded(nnUNetTrainer, nnunet, monkeypatch, **changes)
    assert "Lateral mirroring: none" in log_of(ours) and "lateral_mirroring" not in ours.plans_manager.plans
    assert torch.equal(our_batch["data"], their_batch["data"])
    assert all(torch.equal(a, b) for a, b in zip(our_batch["target"], their_batch["target"]))
    assert type(ours.network) is type(theirs.network)
    assert ours.inference_allowed_mirroring_axes == theirs.inference_allowed_mirroring_axes == (0, 1, 2)
    image = torch.randn(1, 16, 32, 32)
    logits = []
    for trainer in (ours, theirs):
        trainer.set_deep_supervision_enabled(False)
        predictor = nnUNetPredictor(use_mirroring=True, perform_everything_on_device=False, device=torch.device("cpu"),
                                    allow_tqdm=False)
        predictor.manual_initialization(trainer.network, trainer.plans_manager, trainer.configuration_manager, None,
                                        trainer.dataset_json, type(trainer).__name__,
                                        trainer.inference_allowed_mirroring_axes)
        logits.append(predictor.predict_sliding_window_return_logits(image.clone()))
    assert torch.equal(*logits)


def test_the_same_seed_gives_the_same_images_and_left_right_flips_swap_the_labels(nnunet, monkeypatch):
    """Swap mode: only the labels of left-right-flipped samples change; the images stay nnU-Net's."""
    monkeypatch.setenv("NNUNET_SEGMAMBA_LATERAL", "swap")
    _, ours = seeded(nnUNetTrainerLateral, nnunet, monkeypatch, batches=4)
    _, theirs = seeded(nnUNetTrainer, nnunet, monkeypatch, batches=4)
    swapped_samples = 0
    for our_batch, their_batch in zip(ours, theirs):
        assert torch.equal(our_batch["data"], their_batch["data"])
        for our_target, their_target in zip(our_batch["target"], their_batch["target"]):  # every output scale
            for mine, nnunets in zip(our_target, their_target):
                swapped = nnunets.clone()
                swapped[nnunets == 1], swapped[nnunets == 2] = 2, 1
                assert torch.equal(mine, nnunets) or torch.equal(mine, swapped)
                swapped_samples += not torch.equal(mine, nnunets)
    assert swapped_samples > 0


def test_doctor_reports_a_datasets_pairs_and_axis(nnunet, monkeypatch):
    from nnunet_segmamba.tools.doctor import check_lateral_labels

    for name, folder in nnunet.items():
        monkeypatch.setenv(name, str(folder))
    monkeypatch.delenv("NNUNET_SEGMAMBA_LATERAL", raising=False)
    check = check_lateral_labels(str(SYNTH), "nnUNetPlans", "3d_fullres")
    assert check.status == "ok" and check.detail.startswith("blob_left<->blob_right; lateral pairs: 1<->2 on axis 2 "
                                                            "(exclude) of 3d_fullres")
    assert check_lateral_labels(str(SITK), "nnUNetPlans", "2d").status == "FAIL"  # not planned: says so
    monkeypatch.setenv("NNUNET_SEGMAMBA_LATERAL", "off")
    assert "none (NNUNET_SEGMAMBA_LATERAL=off)" in check_lateral_labels(str(SYNTH), "nnUNetPlans", "3d_fullres").detail
