"""A fold's results apart from its checkpoints: pruned, packed, merged across machines, refused for other data."""

import gzip
import json
import tarfile
import time
from pathlib import Path

import pytest

from nnunet_segmamba.datasets.raw import write_raw_dataset
from nnunet_segmamba.datasets.tasks import task_from_preset
from nnunet_segmamba.tools.fold_results import (DATA_FINGERPRINT, MergeError, data_fingerprint, fold_has_results,
                                                keep_results, merge_results, pack, read_summary,
                                                write_data_fingerprint)
from nnunet_segmamba.tools.sweep_jobs import LOCK, fold_state

MODEL = "Dataset901_A/nnUNetTrainer__nnUNetPlans__3d_fullres"
RESULTS = ["validation/summary.json", "training_log_2026_12_7_10_00_00.txt", "progress.png", "debug.json"]
NOT_RESULTS = ["checkpoint_final.pth", "checkpoint_best.pth", "validation/case_000.nii.gz"]


def trained_fold(root: Path, fold: int = 0, summary: str = '{"foreground_mean": {"Dice": 0.9}}') -> Path:
    """A fold folder as nnU-Net 2.8.1 leaves it after training and validation, and its model folder's files."""
    folder = root / MODEL / f"fold_{fold}"
    (folder / "validation").mkdir(parents=True)
    for name in RESULTS + NOT_RESULTS + [LOCK]:
        (folder / name).write_bytes(summary.encode() if name.endswith("summary.json") else b"x" * 1000)
    for name in ("plans.json", "dataset.json", "dataset_fingerprint.json"):
        (folder.parent / name).write_text(json.dumps({"name": name}))
    return folder


def files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_keep_results_deletes_checkpoints_and_predictions_only(tmp_path):
    folder = trained_fold(tmp_path)
    assert keep_results(folder) == 1000 * len(NOT_RESULTS)
    assert sorted(files(folder)) == sorted(RESULTS + [LOCK])
    assert fold_state(folder) == "finished"  # a re-run of the sweep skips it


def test_fold_state_without_summary(tmp_path):
    folder = tmp_path / "fold_0"
    assert fold_state(folder) == "new"
    folder.mkdir()
    (folder / "checkpoint_final.pth").touch()  # trained, not validated: --c validates it
    assert fold_state(folder) == "interrupted"


@pytest.mark.parametrize("written", ["", '{"foreground_mean": {"Dice": 0.9}, "metric_per_'])
def test_a_summary_cut_off_while_written_is_no_result(tmp_path, written):
    """nnU-Net writes validation/summary.json in place: a training stopped meanwhile leaves it empty or cut off. Such
    a fold is not finished (a sweep validates it again with --c), and neither packed nor compared."""
    folder = trained_fold(tmp_path, summary=written)
    assert not fold_has_results(folder) and read_summary(folder) is None
    assert fold_state(folder) == "interrupted"  # checkpoint_final.pth is there: --c validates it
    assert pack(tmp_path, [folder], tmp_path / "results.tar.gz") == 0
    (folder / "validation" / "summary.json").write_text('{"foreground_mean": {"Dice": 0.9}}')
    assert fold_has_results(folder) and fold_state(folder) == "finished"


def test_archive_round_trip_merges_into_an_empty_folder_and_again_adds_nothing(tmp_path):
    source = tmp_path / "machine_a"
    folds = [trained_fold(source, k) for k in (0, 1)]
    (folds[1] / "validation" / "summary.json").unlink()  # still training: not packed
    write_data_fingerprint(source, "Dataset901_A", "a" * 64)
    archive = tmp_path / "results.tar.gz"
    assert pack(source, folds, archive, plots=False) == 1
    with tarfile.open(archive) as tar:
        names = sorted(tar.getnames())
    fold_0 = f"{MODEL}/fold_0"
    assert names == sorted([f"Dataset901_A/{DATA_FINGERPRINT}", *(f"{MODEL}/{n}" for n in (
        "plans.json", "dataset.json", "dataset_fingerprint.json")), *(f"{fold_0}/{n}" for n in RESULTS
                                                                      if n != "progress.png")])
    target = tmp_path / "machine_b"
    assert merge_results(archive, target) == [fold_0]
    assert files(target) == {name: content for name, content in files(source).items() if name in names}
    assert merge_results(archive, target) == []  # identical files: nothing to add
    assert merge_results(source, target) == []  # a folder merges as its archive does (other files ignored)


def test_merge_refuses_other_data_other_plans_and_other_results_writing_nothing(tmp_path):
    target = tmp_path / "target"
    trained_fold(target, 0)
    write_data_fingerprint(target, "Dataset901_A", "a" * 64)
    before = files(target)

    other_data = tmp_path / "other_data"
    trained_fold(other_data, 1)
    write_data_fingerprint(other_data, "Dataset901_A", "b" * 64)
    with pytest.raises(MergeError, match="trained on other data"):
        merge_results(other_data, target)

    other_plans = tmp_path / "other_plans"
    trained_fold(other_plans, 1)
    (other_plans / MODEL / "plans.json").write_text('{"patch_size": [1, 2, 3]}')
    with pytest.raises(MergeError, match="plans.json differs"):
        merge_results(other_plans, target)

    other_result = tmp_path / "other_result"
    trained_fold(other_result, 0, summary='{"foreground_mean": {"Dice": 0.1}}')
    with pytest.raises(MergeError, match="fold_0 already holds other results"):
        merge_results(other_result, target)
    assert files(target) == before


def test_merge_refuses_archives_with_anything_but_results(tmp_path):
    source = tmp_path / "source"
    trained_fold(source)
    archive = tmp_path / "bad.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(source / MODEL / "fold_0" / "checkpoint_final.pth", arcname=f"{MODEL}/fold_0/checkpoint_final.pth")
    with pytest.raises(MergeError, match="not a results archive"):
        merge_results(archive, tmp_path / "target")
    (tmp_path / "broken.tar.gz").write_bytes(b"not gzip")
    with pytest.raises(MergeError, match="cannot read"):
        merge_results(tmp_path / "broken.tar.gz", tmp_path / "target")
    assert not (tmp_path / "target").exists()


def test_data_fingerprint_follows_the_data_and_splits_not_the_files_time_stamps(tmp_path):
    fingerprints = []
    for machine in ("a", "b"):
        write_raw_dataset(tmp_path / machine, 901, "A", task_from_preset("tiny"), n_train=5, n_test=0, seed=3)
        raw = tmp_path / machine / "Dataset901_A"
        preprocessed = tmp_path / f"{machine}_pre"
        preprocessed.mkdir()
        (preprocessed / "nnUNetPlans.json").write_text(json.dumps({"plans_name": "nnUNetPlans", "b": 1}))
        (preprocessed / "splits_final.json").write_text(json.dumps([{"train": ["A_000"], "val": ["A_001"]}]))
        fingerprints.append(data_fingerprint(raw, preprocessed))
        time.sleep(1.1)  # gzip stamps the second a file was written
    assert fingerprints[0] == fingerprints[1]
    image = raw / "imagesTr" / "A_000_0000.nii.gz"
    image.write_bytes(gzip.compress(gzip.decompress(image.read_bytes()), mtime=12345))
    assert data_fingerprint(raw, preprocessed) == fingerprints[1]
    (preprocessed / "splits_final.json").write_text(json.dumps([{"train": ["A_001"], "val": ["A_000"]}]))
    assert data_fingerprint(raw, preprocessed) != fingerprints[1]
