"""`nnunet-segmamba demo`: the stock pipeline in its own workspace, a report, clear failures."""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from nnunet_segmamba.cli import main
from tests.processes import mentioning, one_per_stop_signal, running, stop_with, wait_for

pytestmark = pytest.mark.e2e
BIN = Path(sys.executable).parent


def demo(workspace: Path, *extra: str, **env) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("nnUNet_")}
    clean.update(env, OMP_NUM_THREADS="2")
    return subprocess.run([str(BIN / "nnunet-segmamba"), "demo", "--workspace", str(workspace), *extra],
                          capture_output=True, text=True, env=clean, timeout=1200)


def test_demo_trains_predicts_evaluates_and_reports(tmp_path):
    user = {name: tmp_path / name for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    for folder in user.values():
        folder.mkdir()
    workspace = tmp_path / "demo"
    result = demo(workspace, "-tr", "nnUNetTrainer", "nnUNetTrainerSegMambaV2", "--epochs", "1", "--iterations",
                  "2", "--device", "cpu", **{k: str(v) for k, v in user.items()})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "| nnUNetTrainerSegMambaV2_demo |" in result.stdout and "mean Dice (test)" in result.stdout
    assert ">> train_nnUNetTrainer_demo" in result.stdout and "Epoch 0" in result.stdout  # progress shown
    # nnU-Net's commands start no more worker processes than these small cases pay for (the demo's time)
    assert re.search(r"nnUNetv2_plan_and_preprocess .* -npfp (\d) -np \1\n", result.stdout)
    assert result.stdout.count(" -npp 0 -nps 0") == 2
    report = json.loads((workspace / "report.json").read_text())
    assert [row["trainer"] for row in report["rows"]] == ["nnUNetTrainer_demo", "nnUNetTrainerSegMambaV2_demo"]
    assert all(0 <= row["mean_dice"] <= 1 and row["params_m"] > 0 for row in report["rows"])
    assert all(set(row["dice"]) == {"blob_left", "blob_right", "tube", "speck"} for row in report["rows"])
    assert "1 epochs x 2 iterations (batch 2), cpu" in report["title"]  # the budget, in the report
    assert (workspace / "demo.png").stat().st_size > 0 and "](demo.png)" in (workspace / "report.md").read_text()
    assert all(not any(folder.iterdir()) for folder in user.values())  # the user's nnU-Net folders untouched
    assert "nnunet-segmamba compare -d 990" in result.stdout
    # the workspace feeds `compare` as the demo's last line says
    compared = subprocess.run([str(BIN / "nnunet-segmamba"), "compare", "-d", "990", "-tr", "nnUNetTrainer_demo",
                               "nnUNetTrainerSegMambaV2_demo", "--baseline", "nnUNetTrainer_demo", "-f", "0", "-o",
                               str(tmp_path / "compare")], capture_output=True, text=True,
                              env={**os.environ, "nnUNet_results": str(workspace / "nnUNet_results")})
    assert compared.returncode == 0, compared.stdout + compared.stderr
    assert "nnUNetTrainerSegMambaV2_demo" in compared.stdout and (tmp_path / "compare" / "compare.md").is_file()


def test_stop_signals_end_the_demo_and_its_training(tmp_path):
    """SIGTERM (`kill`, `timeout`, a scheduler), SIGHUP (a closed terminal) or SIGINT to the demo alone while
    nnUNetv2_train trains: the training ends before the demo does. A demo per signal, side by side."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("nnUNet_")}

    def command(workspace: Path) -> list[str]:
        return [str(BIN / "nnunet-segmamba"), "demo", "--workspace", str(workspace), "-tr", "nnUNetTrainer",
                "--epochs", "100", "--device", "cpu"]

    with one_per_stop_signal(tmp_path, command, {**clean, "OMP_NUM_THREADS": "1"}) as demos:
        for signum, (workspace, process) in demos.items():
            logs = workspace / "nnUNet_results" / "Dataset990_Demo"  # nnU-Net's own training log
            training = wait_for(lambda: any("Epoch 0" in log.read_text() for log in logs.glob("*/fold_0/training_log*"))
                                and [pid for pid, command in mentioning(str(workspace)).items()
                                     if "nnUNetv2_train" in command], 600, "the demo's training")
            assert "interrupted: the demo stopped" in stop_with(signum, process, workspace)
            assert not set(training) & set(running())


def test_demo_refuses_a_folder_it_did_not_create(tmp_path, capsys):
    (tmp_path / "precious.txt").write_text("keep me")
    assert main(["demo", "--workspace", str(tmp_path), "-tr", "nnUNetTrainer"]) == 2
    assert "is not a demo workspace" in capsys.readouterr().err
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_unknown_trainer_is_named(tmp_path, capsys):
    assert main(["demo", "--workspace", str(tmp_path / "w"), "-tr", "nnUNetTrainerNope"]) == 2
    assert "nnUNetTrainerNope" in capsys.readouterr().err and not (tmp_path / "w").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA to make training fail")
def test_failed_step_names_its_log_and_writes_no_report(tmp_path):
    workspace = tmp_path / "demo"
    result = demo(workspace, "-tr", "nnUNetTrainer", "--device", "cuda", "--epochs", "1", "--iterations", "1")
    assert result.returncode == 1
    assert "step 'train_nnUNetTrainer_demo' failed" in result.stderr
    assert str(workspace / "logs" / "train_nnUNetTrainer_demo.log") in result.stderr
    assert not (workspace / "report.md").exists()


def test_steps_side_by_side_log_each_and_a_failure_stops_the_others(tmp_path):
    from nnunet_segmamba.tools.demo import StepFailed, Workspace, run_steps

    workspace = Workspace(tmp_path)
    workspace.logs.mkdir()
    python = [sys.executable, "-c"]
    seconds = run_steps({"a": [*python, "print('Epoch 0')"], "b": [*python, "print('Epoch 1')"]}, workspace,
                        dict(os.environ))
    assert set(seconds) == {"a", "b"}
    assert [(workspace.logs / f"{n}.log").read_text() for n in "ab"] == ["Epoch 0\n", "Epoch 1\n"]
    started = time.time()
    with pytest.raises(StepFailed, match=r"step 'broken' failed \(exit code 3\).*broken.log\nbad input"):
        run_steps({"slow": [*python, "import time; time.sleep(60)"],
                   "broken": [*python, "import sys; print('bad input'); sys.exit(3)"]}, workspace, dict(os.environ))
    assert time.time() - started < 30  # the slow step was stopped, not waited for


def test_the_picture_shows_each_trainer_beside_the_ground_truth(tmp_path):
    from matplotlib.image import imread

    from nnunet_segmamba.tools import demo_report

    label = np.zeros((5, 8, 8), np.uint8)
    label[1, 2, 2], label[3, 1:3, 1:3], label[3, 5, 5] = 1, 1, 2  # slice 3 shows two classes
    assert demo_report.most_telling_slice(label) == 3
    curves = {"a_demo": {"train_losses": [1.0, 0.5], "mean_fg_dice": [0.3, 0.7], "ema_fg_dice": [0.2, 0.6]}}
    widths = []
    for trainers in (["a_demo"], ["a_demo", "b_demo", "c_demo", "d_demo", "e_demo"]):
        path = tmp_path / f"{len(trainers)}.png"
        demo_report.plot(path, np.random.rand(5, 8, 8), label, {t: label for t in trainers},
                         {t: curves["a_demo"] for t in trainers}, ["one", "two"], "title")
        widths.append(imread(path).shape[1])
    assert widths[1] > widths[0]  # a column per trainer
