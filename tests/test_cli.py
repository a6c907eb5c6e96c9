"""`nnunet-segmamba env` and `doctor`, and the documented set-up line with nnU-Net's own lookup."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from nnunet_segmamba.cli import main
from nnunet_segmamba.tools import doctor, environment

PUBLIC_TRAINERS = ["nnUNetTrainerSegMambaV2", "nnUNetTrainerSegMambaV2_250epochs", "nnUNetTrainerSegMambaV2RST",
                   "nnUNetTrainerSegMamba", "nnUNetTrainerSegMamba_250epochs", "nnUNetTrainerMambaClinix",
                   "nnUNetTrainerMambaClinixRST", "nnUNetTrainerLateral", "nnUNetTrainerSegMambaV2NoMamba",
                   "nnUNetTrainerSegMambaNoMamba", "nnUNetTrainerMambaClinixNoMamba"]
BIN = Path(sys.executable).parent


def test_env_prints_the_trainers_folder(capsys, monkeypatch):
    monkeypatch.setenv("nnUNet_extTrainer", os.pathsep.join(["/somewhere/else", "/another one"]))
    assert main(["env"]) == 0
    line = capsys.readouterr().out.strip()
    folder = environment.trainers_folder()
    assert line.startswith("export nnUNet_extTrainer=")
    assert line.split("=", 1)[1].strip("'").split(os.pathsep) == [folder, "/somewhere/else", "/another one"]
    assert sorted(p.stem for p in Path(folder).glob("nnUNetTrainer*.py"))


def documented_shell(command: str, **env) -> subprocess.CompletedProcess:
    """`command` in a fresh bash that did only the README's set-up line."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("nnUNet_")}
    clean["PATH"] = f"{BIN}{os.pathsep}{clean['PATH']}"
    return subprocess.run(["bash", "-c", f'eval "$(nnunet-segmamba env)" && {command}'], capture_output=True,
                          text=True, env={**clean, **env})


def test_documented_line_lets_nnunet_find_every_public_trainer():
    script = ("from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name as find\n"
              f"for name in {PUBLIC_TRAINERS!r}:\n"
              "    cls = find(name)\n"
              "    print('FOUND', name, cls.__module__)\n")
    result = documented_shell(f"{sys.executable} -c \"{script}\"")
    assert result.returncode == 0, result.stderr
    found = [line.split()[1] for line in result.stdout.splitlines() if line.startswith("FOUND")]
    assert found == PUBLIC_TRAINERS
    assert all("nnunet_segmamba.training." in line for line in result.stdout.splitlines() if line.startswith("FOUND"))


@pytest.fixture
def nnunet_folders(tmp_path, monkeypatch):
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        (tmp_path / name).mkdir()
        monkeypatch.setenv(name, str(tmp_path / name))
    return tmp_path


def test_doctor_passes_with_the_documented_setup(nnunet_folders, monkeypatch, capsys):
    monkeypatch.setenv("nnUNet_extTrainer", environment.trainers_folder())
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert "All checks passed." in out and "self-test vs float64 reference" in out
    assert "nnU-Net finds nnUNetTrainerSegMambaV2" in out


def test_doctor_fails_with_advice(nnunet_folders, monkeypatch, capsys):
    monkeypatch.delenv("nnUNet_results")
    monkeypatch.setenv("nnUNet_extTrainer", "/an/unrelated/folder")
    assert main(["doctor"]) == 1
    out = capsys.readouterr().out
    assert "[FAIL] nnUNet_results" in out and "export nnUNet_results=" in out
    assert "but not this installation's trainers folder" in out and 'eval "$(nnunet-segmamba env)"' in out
    assert "2 problem(s): nnUNet_results, nnUNet_extTrainer" in out


def test_doctor_reports_an_unset_hook(nnunet_folders, monkeypatch):
    monkeypatch.delenv("nnUNet_extTrainer", raising=False)
    [check] = doctor.check_trainer_hook()
    assert check.status == "FAIL" and "Could not find requested nnunet trainer" in check.detail


def test_doctor_says_whether_nnunets_default_compile_can_run(monkeypatch):
    """On CUDA nnUNetv2_train compiles by default; without working Triton kernels that run would fail."""
    import torch

    from nnunet_segmamba.mamba import backends

    monkeypatch.delenv("nnUNet_compile", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert doctor.check_compile().detail == "off here: nnU-Net compiles only on CUDA"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(backends.GPU_OPS, "triton", lambda index: (None, "Triton could not be imported (no cc)"))
    check = doctor.check_compile()
    assert check.status == "FAIL" and "but Triton could not be imported (no cc)" in check.detail
    assert "export nnUNet_compile=0" in check.advice
    monkeypatch.setitem(backends.GPU_OPS, "triton", lambda index: (backends.TORCH_OPS, ""))
    check = doctor.check_compile()
    assert check.status == "ok" and "compile with the triton scan" in check.detail
    monkeypatch.setenv("nnUNet_compile", "f")
    assert doctor.check_compile().detail == "off (nnUNet_compile=f): eager training"


def test_doctor_console_script(tmp_path):
    folders = {name: str(tmp_path) for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    result = documented_shell("nnunet-segmamba doctor", **folders)
    assert result.returncode == 0, result.stdout + result.stderr
    result = subprocess.run([BIN / "nnunet-segmamba", "doctor"], capture_output=True, text=True,
                            env={k: v for k, v in os.environ.items() if not k.startswith("nnUNet_")})
    assert result.returncode == 1 and "problem(s)" in result.stdout
