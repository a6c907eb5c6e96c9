"""`nnunet-segmamba compare` on generated nnU-Net results trees: numbers, statistics, files, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from nnunet_segmamba.cli import main as cli_main

FOLDS = ["0", "1", "2", "3", "4"]
CASES_PER_FOLD = 4
DATASETS = {"Dataset501_Alpha": [1, 2], "Dataset502_Beta": [1]}  # with results; Dataset503_Gamma: raw only
TRAINERS = {"nnUNetTrainer": 60, "TrainerA": 30, "TrainerB": 90}  # the larger, the more FP/FN: worse Dice
MISSING_FOLD = ("Dataset502_Beta", "TrainerB", "3")
ABSENT = ("Dataset501_Alpha", "0", 2)  # in fold 0, case 0 has no label 2 and none predicted: Dice NaN
PLANS_CONFIG = "nnUNetPlans__3d_fullres"


def case_counts(rng: np.random.Generator, noise: int, absent: bool) -> dict:
    """nnU-Net's per-class metrics of one generated case."""
    if absent:
        tp = fp = fn = 0
    else:
        tp, fp, fn = int(rng.integers(100, 300)), int(rng.integers(0, noise)), int(rng.integers(0, noise))
    dice = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else float("nan")
    iou = tp / (tp + fp + fn) if tp + fp + fn else float("nan")
    return {"Dice": dice, "IoU": iou, "TP": tp, "FP": fp, "FN": fn, "TN": 10000 - tp - fp - fn,
            "n_pred": tp + fp, "n_ref": tp + fn}


def write_fold(folder: Path, cases: dict[str, dict[int, dict]]) -> None:
    """A validation/summary.json written by nnU-Net's own save_summary_json."""
    from nnunetv2.evaluation.evaluate_predictions import save_summary_json

    labels = list(next(iter(cases.values())))
    per_case = [{"metrics": metrics, "reference_file": f"/gt/{case}.nii.gz",
                 "prediction_file": str(folder / f"{case}.nii.gz")} for case, metrics in cases.items()]
    means = {label: {m: float(np.nanmean([c[label][m] for c in cases.values()])) for m in ("Dice", "IoU")}
             for label in labels}
    foreground = {m: float(np.mean([means[label][m] for label in labels])) for m in ("Dice", "IoU")}
    folder.mkdir(parents=True)
    save_summary_json({"metric_per_case": per_case, "mean": means, "foreground_mean": foreground},
                      str(folder / "summary.json"))


@pytest.fixture
def tree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    """A results tree; returns the generated Dice: truth[dataset][trainer][fold][case][label]."""
    results, raw = tmp_path / "results", tmp_path / "raw"
    (raw / "Dataset503_Gamma").mkdir(parents=True)
    monkeypatch.setenv("nnUNet_results", str(results))
    monkeypatch.setenv("nnUNet_raw", str(raw))
    monkeypatch.delenv("nnUNet_preprocessed", raising=False)
    truth = {}
    for d, (dataset, labels) in enumerate(DATASETS.items()):
        for t, (trainer, noise) in enumerate(TRAINERS.items()):
            rng = np.random.default_rng(100 * d + t)
            truth.setdefault(dataset, {})[trainer] = {}
            for fold in FOLDS:
                cases = {f"case_{fold}{i}": {label: case_counts(rng, noise, (dataset, fold, label) == ABSENT
                                                                and i == 0) for label in labels}
                         for i in range(CASES_PER_FOLD)}
                if (dataset, trainer, fold) == MISSING_FOLD:
                    continue
                truth[dataset][trainer][fold] = {c: {k: v["Dice"] for k, v in m.items()} for c, m in cases.items()}
                write_fold(results / dataset / f"{trainer}__{PLANS_CONFIG}" / f"fold_{fold}" / "validation", cases)
    return truth


def case_foreground(folds: dict) -> dict[str, float]:
    return {case: float(np.nanmean(list(labels.values()))) for fold in folds.values() for case, labels in fold.items()}


def expected_dice(folds: dict) -> float:
    """nnU-Net's foreground mean: mean over classes of the class means over all cases."""
    labels = next(iter(next(iter(folds.values())).values()))
    return float(np.mean([np.nanmean([c[k] for f in folds.values() for c in f.values()]) for k in labels]))


def run_compare(tmp_path: Path, *extra: str) -> tuple[int, Path]:
    output = tmp_path / "out"
    code = cli_main(["compare", "-d", "501", "502", "503", "-tr", "TrainerA", "TrainerB", "-o", str(output),
                     *extra])
    return code, output


@pytest.fixture
def compared(tree: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> tuple[dict, Path, str]:
    code, output = run_compare(tmp_path)
    assert code == 0
    return tree, output, capsys.readouterr().out


def overview_row(output: Path, dataset: str, method: str, split: str = "cv") -> dict:
    rows = json.loads((output / "compare.json").read_text())["overview"]
    return next(r for r in rows if (r["split"], r["dataset"], r["method"]) == (split, dataset, method))


def test_aggregates_equal_hand_computed(compared: tuple) -> None:
    truth, output, _ = compared
    for dataset in DATASETS:
        for trainer, folds in truth[dataset].items():
            row = overview_row(output, dataset, trainer)
            case_fg = list(case_foreground(folds).values())
            fold_fg = [expected_dice({f: folds[f]}) for f in folds]
            assert row["dice"] == pytest.approx(expected_dice(folds), abs=1e-12)
            assert row["std_cases"] == pytest.approx(np.std(case_fg, ddof=1), abs=1e-12)
            assert row["std_folds"] == pytest.approx(np.std(fold_fg, ddof=1), abs=1e-12)
            assert (row["folds"], row["cases"]) == (len(folds), len(folds) * CASES_PER_FOLD)
    classes = json.loads((output / "compare.json").read_text())["per_class"]
    label_2 = next(r for r in classes if (r["dataset"], r["method"], r["label"]) == ("Dataset501_Alpha",
                                                                                     "TrainerA", "2"))
    values = [c[2] for f in truth["Dataset501_Alpha"]["TrainerA"].values() for c in f.values()]
    assert label_2["dice"] == pytest.approx(np.nanmean(values), abs=1e-12)
    assert label_2["cases"] == len(FOLDS) * CASES_PER_FOLD - 1  # the case without label 2


def test_ranks_per_dataset_and_mean_rank(compared: tuple) -> None:
    truth, output, _ = compared
    ranks = {}
    for dataset in DATASETS:
        order = sorted(truth[dataset], key=lambda t: -expected_dice(truth[dataset][t]))
        for rank, trainer in enumerate(order, start=1):
            assert overview_row(output, dataset, trainer)["rank"] == rank
            ranks.setdefault(trainer, []).append(rank)
    mean_ranks = json.loads((output / "compare.json").read_text())["mean_ranks"]
    assert {r["method"]: r["mean_rank"] for r in mean_ranks} == {t: np.mean(r) for t, r in ranks.items()}
    assert [r["mean_rank"] for r in mean_ranks] == sorted(r["mean_rank"] for r in mean_ranks)


def holm_by_hand(p: list[float]) -> list[float]:
    order = sorted(range(len(p)), key=p.__getitem__)
    adjusted, running = [0.0] * len(p), 0.0
    for step, i in enumerate(order):
        running = max(running, min(1.0, (len(p) - step) * p[i]))
        adjusted[i] = running
    return adjusted


def test_wilcoxon_and_holm_agree_with_scipy(compared: tuple) -> None:
    truth, output, _ = compared
    tests = json.loads((output / "compare.json").read_text())["tests"]
    assert len(tests) == 4  # 2 trainers x 2 datasets against nnUNetTrainer
    for test in tests:
        method = case_foreground(truth[test["dataset"]][test["method"]])
        baseline = case_foreground(truth[test["dataset"]]["nnUNetTrainer"])
        shared = sorted(set(method) & set(baseline))
        expected = stats.wilcoxon([method[c] for c in shared], [baseline[c] for c in shared])
        assert test["pairs"] == len(shared)
        assert test["p"] == pytest.approx(expected.pvalue, rel=1e-12)
        assert test["statistic"] == pytest.approx(expected.statistic)
        assert test["mean_diff"] == pytest.approx(np.mean([method[c] - baseline[c] for c in shared]))
    assert [t["p_holm"] for t in tests] == pytest.approx(holm_by_hand([t["p"] for t in tests]), rel=1e-12)
    beta_b = next(t for t in tests if (t["dataset"], t["method"]) == ("Dataset502_Beta", "TrainerB"))
    assert beta_b["pairs"] == (len(FOLDS) - 1) * CASES_PER_FOLD  # only the cases of the folds both have


def test_missing_fold_dataset_and_files_reported(compared: tuple) -> None:
    _, output, printed = compared
    assert "4/5 !" in printed and "fold 3 missing" in printed and "over 4 of 5 folds" in printed
    assert "Dataset503_Gamma / all trainers: no results folder" in printed
    report = json.loads((output / "compare.json").read_text())
    assert {"split": "cv", "dataset": "Dataset502_Beta", "method": "TrainerB",
            "reason": "fold 3 missing (no fold_<k>/validation/summary.json): its numbers are over 4 of 5 folds"
            } in report["missing"]
    gamma = overview_row(output, "Dataset503_Gamma", "TrainerA")
    assert (gamma["folds"], gamma["dice"], gamma["rank"]) == (0, None, None)
    assert "fold 3 missing" in (output / "compare.md").read_text()
    names = {p.name for p in output.iterdir()}
    assert {"compare.md", "compare.json", "overview.csv", "per_class.csv", "per_case.csv", "mean_ranks.csv",
            "tests.csv", "cv_overview.png", "cv_dice_per_case_Dataset501_Alpha.png",
            "cv_dice_per_case_Dataset502_Beta.png"} == names
    assert all((output / n).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for n in names if n.endswith(".png"))
    import pandas as pd

    per_case = pd.read_csv(output / "per_case.csv")
    rows = sum(len(FOLDS) * len(TRAINERS) * CASES_PER_FOLD * len(labels) for labels in DATASETS.values())
    assert len(per_case) == rows - CASES_PER_FOLD  # the missing fold's cases, one class each


def test_a_summary_cut_off_while_written_is_reported_not_read(tree: dict, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture) -> None:
    """A fold whose training stopped while nnU-Net wrote its validation summary (an empty file) is a gap with what
    to do, and the table is over the other folds."""
    summary = (Path(os.environ["nnUNet_results"]) / "Dataset501_Alpha" / f"TrainerA__{PLANS_CONFIG}" / "fold_1" /
               "validation" / "summary.json")
    summary.write_text("")
    code, output = run_compare(tmp_path)
    printed = capsys.readouterr().out
    assert code == 0 and "fold 1's validation/summary.json is incomplete" in printed and "--val" in printed
    assert overview_row(output, "Dataset501_Alpha", "TrainerA")["folds"] == len(FOLDS) - 1


def test_errors_exit_2_without_outputs(tree: dict, tmp_path: Path, capsys: pytest.CaptureFixture,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    cases = [
        (["-d", "999"], "unknown dataset '999': Could not find a dataset with the ID 999"),
        (["-d", "503"], "no results found for datasets Dataset503_Gamma"),
        (["--test-labels", "/x"], "--test-labels needs --test-predictions"),
        (["--test-predictions", "/p/{nope}"], "unknown field {nope}"),
    ]
    for extra, message in cases:
        code, output = run_compare(tmp_path, *extra)
        assert code == 2 and message in capsys.readouterr().err and not output.exists()
    model = Path(os.environ["nnUNet_results"]) / "Dataset502_Beta" / f"TrainerA__{PLANS_CONFIG}"
    (model / "fold_all").symlink_to(model / "fold_0")
    code, output = run_compare(tmp_path, "-f", "0", "all")
    assert code == 2 and "case_00 of Dataset502_Beta / TrainerA is in folds 0, all" in capsys.readouterr().err
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert cli_main(["compare", "-d", "501", "-tr", "TrainerA", "-o", str(blocker / "out")]) == 2
    assert "is not writable" in capsys.readouterr().err
    monkeypatch.delenv("nnUNet_results")
    code, output = run_compare(tmp_path)
    assert code == 2 and "nnUNet_results is not set" in capsys.readouterr().err and not output.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def write_image(path: Path, array: np.ndarray) -> None:
    import SimpleITK as sitk

    sitk.WriteImage(sitk.GetImageFromArray(array.astype(np.uint8)), str(path))


def test_test_set_scored_with_nnunet(tree: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    dataset = "Dataset502_Beta"
    labels, predictions = tmp_path / "labelsTs", tmp_path / "predictions"
    labels.mkdir()
    reference = np.zeros((3, 8, 8), dtype=np.uint8)
    reference[1, 2:6, 2:6] = 1  # 16 voxels
    write_image(labels / "t1.nii.gz", reference)
    write_image(labels / "t2.nii.gz", reference)
    for trainer, shift in (("nnUNetTrainer", 1), ("TrainerA", 0)):
        model = Path(os.environ["nnUNet_results"]) / dataset / f"{trainer}__{PLANS_CONFIG}"
        (model / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "a": 1},
                                                        "file_ending": ".nii.gz", "channel_names": {"0": "x"}}))
        (model / "plans.json").write_text(json.dumps({"dataset_name": dataset, "plans_name": "nnUNetPlans",
                                                      "image_reader_writer": "SimpleITKIO",
                                                      "label_manager": "LabelManager", "configurations": {}}))
        (predictions / trainer).mkdir(parents=True)
        write_image(predictions / trainer / "t1.nii.gz", np.roll(reference, shift, axis=2))
    code, output = run_compare(tmp_path, "--test-predictions", str(predictions / "{trainer}"),
                               "--test-labels", str(labels), "-np", "1")
    printed = capsys.readouterr().out
    assert code == 0 and "Test set" in printed
    assert "1 of 2 test cases have no prediction: its numbers are over 1 cases" in printed
    assert "Dataset502_Beta / TrainerB: no test predictions folder" in printed
    shifted = 2 * 12 / (2 * 12 + 4 + 4)  # the roll by one voxel keeps 12 of 16 voxels
    assert overview_row(output, dataset, "nnUNetTrainer", "test")["dice"] == pytest.approx(shifted)
    assert overview_row(output, dataset, "TrainerA", "test")["dice"] == pytest.approx(1.0)
    assert (output / "test_overview.png").is_file()


def test_console_script(tree: dict, tmp_path: Path) -> None:
    script = Path(sys.executable).with_name("nnunet-segmamba")
    output = tmp_path / "out"
    done = subprocess.run([str(script), "compare", "-d", "501", "502", "-tr", "TrainerA", "TrainerB",
                           "-o", str(output)], capture_output=True, text=True, env=os.environ.copy(), timeout=120)
    assert done.returncode == 0, done.stderr
    assert "Cross-validation: foreground Dice, baseline nnUNetTrainer" in done.stdout
    assert (output / "compare.md").is_file()
    failed = subprocess.run([str(script), "compare", "-d", "999", "-tr", "TrainerA"], capture_output=True,
                            text=True, env=os.environ.copy(), timeout=120, cwd=tmp_path)
    assert failed.returncode == 2 and failed.stderr.count("\n") == 1


def write_model_files(model: Path, configuration: dict) -> None:
    """The plans.json and dataset.json that nnU-Net copies into a model folder (one 3d_fullres configuration)."""
    (model / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "a": 1, "b": 2}, "numTraining": 2,
                                                    "channel_names": {"0": "x"}, "file_ending": ".nii.gz"}))
    (model / "plans.json").write_text(json.dumps({
        "dataset_name": model.parent.name, "plans_name": "nnUNetPlans", "image_reader_writer": "SimpleITKIO",
        "label_manager": "LabelManager", "configurations": {"3d_fullres": configuration}}))


def test_parameter_column(tree: dict, tmp_path: Path, capsys: pytest.CaptureFixture,
                          monkeypatch: pytest.MonkeyPatch) -> None:
    """params M: the network each trainer builds from its model folder's plans, for nnU-Net's trainer and ours
    (found without the user's nnUNet_extTrainer); empty for a trainer nnU-Net's lookup does not find, or without
    plans."""
    import shutil

    import pandas as pd
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    from nnunet_segmamba.networks.plans import build_network
    from nnunet_segmamba.networks.segmamba import SegMambaV2
    from tests import nnunet_plans

    monkeypatch.delenv("nnUNet_extTrainer", raising=False)
    ours = "nnUNetTrainerSegMambaV2NoMamba"
    dataset = Path(os.environ["nnUNet_results"]) / "Dataset501_Alpha"
    shutil.copytree(dataset / f"TrainerA__{PLANS_CONFIG}", dataset / f"{ours}__{PLANS_CONFIG}")
    configuration = nnunet_plans.configuration([64] * 3, [[1, 1, 1]] + [[2, 2, 2]] * 3, [[3, 3, 3]] * 4,
                                               [32, 64, 128, 256])
    for trainer in ("nnUNetTrainer", "TrainerA", ours):
        write_model_files(dataset / f"{trainer}__{PLANS_CONFIG}", configuration.configuration)

    def millions(network) -> float:
        return sum(p.numel() for p in network.parameters()) / 1e6

    plain = millions(get_network_from_plans(configuration.network_arch_class_name,
                                            configuration.network_arch_init_kwargs,
                                            configuration.network_arch_init_kwargs_req_import, 1, 3))
    ablated = millions(build_network(SegMambaV2, configuration, 1, 3, False, mamba=False))
    assert 1 < ablated < millions(build_network(SegMambaV2, configuration, 1, 3, False)) and plain > 1

    code, output = run_compare(tmp_path, "-tr", "TrainerA", ours)
    printed = capsys.readouterr().out
    assert code == 0
    expected = {"nnUNetTrainer": plain, "TrainerA": None, ours: ablated}
    for method, value in expected.items():
        found = overview_row(output, "Dataset501_Alpha", method)["params_m"]
        assert found is None if value is None else found == pytest.approx(value)
        assert overview_row(output, "Dataset502_Beta", method)["params_m"] is None  # no plans.json
    csv = pd.read_csv(output / "overview.csv").query("dataset == 'Dataset501_Alpha'").set_index("method")
    assert csv["params_m"].to_dict() == pytest.approx({m: v or np.nan for m, v in expected.items()}, nan_ok=True)
    markdown = (output / "compare.md").read_text()
    assert "| dataset | method | params M | folds |" in markdown
    assert f"| Dataset501_Alpha | {ours} | {ablated:.1f} | 5/5 |" in markdown
    assert "| Dataset501_Alpha | TrainerA |  | 5/5 |" in markdown
    header = next(line for line in printed.splitlines() if "params M" in line)
    row = next(line for line in printed.splitlines() if line.split()[:2] == ["Dataset501_Alpha", "nnUNetTrainer"])
    assert header.split()[:4] == ["dataset", "method", "params", "M"] and row.split()[2] == f"{plain:.1f}"
