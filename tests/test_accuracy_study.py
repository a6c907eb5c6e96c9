"""benchmarks/accuracy.py's tables of whatever folds have accumulated: cells with one fold, some, or none; each
network against its No-Mamba ablation."""

import argparse
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from tests.test_compare import case_counts, write_fold

SPEC = importlib.util.spec_from_file_location("accuracy", Path(__file__).parents[1] / "benchmarks" / "accuracy.py")
accuracy = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(accuracy)

LABELS = {"background": 0, "left": 1, "right": 2}
FOLDS = {("Dataset981_Lateral", "nnUNetTrainerLateral"): ["0", "1"],
         ("Dataset981_Lateral", "nnUNetTrainerSegMambaV2"): ["0"],
         ("Dataset984_Brain", "nnUNetTrainerLateral"): ["2"]}


def write_model(root: Path, dataset: str, trainer: str, folds: list[str], noise: int, rng) -> None:
    """A budget variant's model folder with `folds` of 4 validation cases (case_<fold><i>), two classes whose
    false positives and negatives are drawn below `noise` voxels."""
    model = root / dataset / f"{trainer}_e10i40__nnUNetPlans__3d_fullres"
    for fold in folds:
        write_fold(model / f"fold_{fold}" / "validation",
                   {f"case_{fold}{i}": {1: case_counts(rng, noise, False), 2: case_counts(rng, noise, False)}
                    for i in range(4)})
    (model / "dataset.json").write_text(json.dumps({"labels": LABELS}))


def study(root: Path, tasks: list[int], trainers: list[str]):
    args = argparse.Namespace(tasks=tasks, trainers=trainers, folds=["0", "1", "2"], epochs=10, iterations=40)
    return accuracy.comparison(root, args), args


def test_table_of_partial_cells(tmp_path, monkeypatch):
    """Two folds: mean ± sd; one fold: the mean alone (the first GPU folds crashed the table there); none: a row
    saying 0 folds. Differences are paired on the cases both trainers have."""
    monkeypatch.delenv("nnUNet_preprocessed", raising=False)
    monkeypatch.delenv("nnUNet_raw", raising=False)
    rng = np.random.default_rng(0)
    for (dataset, trainer), folds in FOLDS.items():
        write_model(tmp_path, dataset, trainer, folds, 50, rng)
    result, args = study(tmp_path, [981, 984], ["nnUNetTrainerLateral", "nnUNetTrainerSegMambaV2"])
    rows = {tuple(cell.strip() for cell in line.split("|")[1:4]): line for line in
            accuracy.table(result, tmp_path, args).splitlines()[2:]}
    assert set(rows) == {("Lateral", "nnUNetTrainerLateral", "2"), ("Lateral", "nnUNetTrainerSegMambaV2", "1"),
                         ("Brain", "nnUNetTrainerLateral", "1"), ("Brain", "nnUNetTrainerSegMambaV2", "0")}
    two, one = rows["Lateral", "nnUNetTrainerLateral", "2"], rows["Lateral", "nnUNetTrainerSegMambaV2", "1"]
    assert "left " in two and two.count("±") == 3 and "| baseline |" in two
    assert "left " in one and "±" not in one and ("| +" in one or "| -" in one)
    assert "| – |" in rows["Brain", "nnUNetTrainerLateral", "1"]  # no parameters without plans.json
    assert accuracy.mean_sd(0.9, float("nan")) == "0.900" and accuracy.mean_sd(None, None) == "–"


def test_each_network_against_its_ablation(tmp_path, monkeypatch):
    """The ablation table pairs SegMamba-V2 with SegMamba-V2 NoMamba (not with the baseline) on their common
    cases: with Mamba far better on all 12 cases, Δ > 0 and the test significant; a network without its ablation
    among the trainers has no row."""
    monkeypatch.delenv("nnUNet_preprocessed", raising=False)
    monkeypatch.delenv("nnUNet_raw", raising=False)
    rng = np.random.default_rng(1)
    folds = ["0", "1", "2"]
    for trainer, noise in (("nnUNetTrainerLateral", 300), ("nnUNetTrainerSegMambaV2", 2),
                           ("nnUNetTrainerSegMambaV2NoMamba", 400), ("nnUNetTrainerSegMamba", 2)):
        write_model(tmp_path, "Dataset981_Lateral", trainer, folds, noise, rng)
    trainers = ["nnUNetTrainerLateral", "nnUNetTrainerSegMambaV2", "nnUNetTrainerSegMambaV2NoMamba",
                "nnUNetTrainerSegMamba"]
    result, args = study(tmp_path, [981], trainers)
    rows = [[cell.strip() for cell in line.split("|")[1:-1]]
            for line in accuracy.ablation_table(result, args).splitlines()[2:]]
    assert [row[:3] for row in rows] == [["Lateral", "nnUNetTrainerSegMambaV2", "12"]]
    with_mamba, without, difference, p_holm = (float(cell) for cell in rows[0][3:])
    assert with_mamba > without and difference == pytest.approx(with_mamba - without, abs=0.002)
    assert difference > 0.1 and p_holm < 0.01
    fg_dice = result.overview.set_index("method")["dice"]
    assert without == pytest.approx(fg_dice["nnUNetTrainerSegMambaV2NoMamba_e10i40"], abs=5e-4)
    result, args = study(tmp_path, [981], trainers[:2])
    assert accuracy.ablation_table(result, args) == "no network with its ablation yet"
