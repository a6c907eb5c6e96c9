"""benchmarks/accuracy.py's table of whatever folds have accumulated: cells with one fold, some, or none."""

import argparse
import importlib.util
import json
from pathlib import Path

import numpy as np

from tests.test_compare import case_counts, write_fold

SPEC = importlib.util.spec_from_file_location("accuracy", Path(__file__).parents[1] / "benchmarks" / "accuracy.py")
accuracy = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(accuracy)

FOLDS = {("Dataset981_Lateral", "nnUNetTrainerLateral"): ["0", "1"],
         ("Dataset981_Lateral", "nnUNetTrainerSegMambaV2"): ["0"],
         ("Dataset984_Brain", "nnUNetTrainerLateral"): ["2"]}


def test_table_of_partial_cells(tmp_path, monkeypatch):
    """Two folds: mean ± sd; one fold: the mean alone (the first GPU folds crashed the table there); none: a row
    saying 0 folds. Differences are paired on the cases both trainers have."""
    monkeypatch.delenv("nnUNet_preprocessed", raising=False)
    monkeypatch.delenv("nnUNet_raw", raising=False)
    rng = np.random.default_rng(0)
    for (dataset, trainer), folds in FOLDS.items():
        model = tmp_path / dataset / f"{trainer}_e10i40__nnUNetPlans__3d_fullres"
        for fold in folds:
            write_fold(model / f"fold_{fold}" / "validation",
                       {f"case_{fold}{i}": {1: case_counts(rng, 50, False), 2: case_counts(rng, 50, False)}
                        for i in range(4)})
        (model / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "left": 1, "right": 2}}))
    args = argparse.Namespace(tasks=[981, 984], trainers=["nnUNetTrainerLateral", "nnUNetTrainerSegMambaV2"],
                              folds=["0", "1", "2"], epochs=10, iterations=40)
    rows = {tuple(cell.strip() for cell in line.split("|")[1:4]): line for line in
            accuracy.table(tmp_path, args).splitlines()[2:]}
    assert set(rows) == {("Lateral", "nnUNetTrainerLateral", "2"), ("Lateral", "nnUNetTrainerSegMambaV2", "1"),
                         ("Brain", "nnUNetTrainerLateral", "1"), ("Brain", "nnUNetTrainerSegMambaV2", "0")}
    two, one = rows["Lateral", "nnUNetTrainerLateral", "2"], rows["Lateral", "nnUNetTrainerSegMambaV2", "1"]
    assert "left " in two and two.count("±") == 3 and "| baseline |" in two
    assert "left " in one and "±" not in one and ("| +" in one or "| -" in one)
    assert "| – |" in rows["Brain", "nnUNetTrainerLateral", "1"]  # no parameters without plans.json
    assert accuracy.mean_sd(0.9, float("nan")) == "0.900" and accuracy.mean_sd(None, None) == "–"
