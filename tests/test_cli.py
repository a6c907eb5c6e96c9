"""`nnunet-segmamba env` and `doctor`, and the documented set-up line with nnU-Net's own lookup."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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
    out, err = capsys.readouterr()
    assert "[FAIL] nnUNet_results" in out and "export nnUNet_results=" in out
    assert "but not this installation's trainers folder" in out and 'eval "$(nnunet-segmamba env)"' in out
    assert err == ("nnunet-segmamba doctor: error: 2 problem(s): nnUNet_results, nnUNet_extTrainer; fix them as the "
                   "'->' lines above say\n")


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
    assert result.returncode == 1 and "problem(s)" in result.stderr and "[FAIL]" in result.stdout


USAGE_ERRORS = {  # a usage error of every command: its arguments, what the one line on stderr says
    "demo": (["--epochs", "0"], "--epochs and --iterations must be at least 1"),
    "synth": (["-d", "901", "--cases", "-3"], "pass --cases 5 or more"),
    "plan": (["-d", "901", "-pl", "SegMambaV2"], "nnUNet_raw is not set: export it"),
    "sweep": (["-d", "901", "-tr", "nnUNetTrainer"], "nnUNet_preprocessed is not set: export nnUNet_preprocessed="),
    "compare": (["-d", "901", "-tr", "nnUNetTrainer"], "nnUNet_results is not set"),
    "benchmark": (["--preset", "3d_64", "-tr", "nnUNetTrainerNope"], "unknown trainer 'nnUNetTrainerNope'"),
    "benchmark-scan": ([], "needs a CUDA GPU; on the CPU use --reference"),
}


@pytest.mark.parametrize("tool", list(USAGE_ERRORS))
def test_every_command_reports_usage_errors_on_stderr_with_exit_code_2(tool, tmp_path, monkeypatch, capsys):
    """Nothing on stdout (where results go), one line on stderr naming the command and what to do, nothing written."""
    if tool == "benchmark-scan" and torch.cuda.is_available():
        pytest.skip("with CUDA the backend comparison runs")
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    arguments, message = USAGE_ERRORS[tool]
    assert main([tool, *arguments]) == 2
    out, err = capsys.readouterr()
    assert not out and err.startswith(f"nnunet-segmamba {tool}: error: ") and err.count("\n") == 1, (out, err)
    assert message in err and not any(tmp_path.iterdir())


def test_env_and_argparse_usage_errors_exit_2_on_stderr(capsys):
    """`eval "$(nnunet-segmamba env --bogus)"` gets nothing to evaluate."""
    for arguments in (["env", "--bogus"], ["synth"], ["doctor", "-c"]):
        with pytest.raises(SystemExit) as exit_:
            main(arguments)
        out, err = capsys.readouterr()
        last = err.splitlines()[-1]
        assert exit_.value.code == 2 and not out and last.startswith("nnunet-segmamba") and ": error: " in last


def test_failures_exit_1_on_stderr(tmp_path, capsys, monkeypatch):
    """A failure of the work itself (here: the raw folder cannot be created) is exit code 1, and says what to do."""
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert main(["synth", "-d", "901", "--raw", str(blocker / "raw"), "--cases", "5", "-np", "1"]) == 1
    out, err = capsys.readouterr()
    assert out.startswith("Generating") and err.startswith("nnunet-segmamba synth: error: ")
    assert "choose a writable --raw folder" in err


def test_our_commands_find_our_trainers_without_the_users_hook(monkeypatch):
    """The commands set nnUNet_extTrainer for their own lookups (doctor excepted: it reports the user's)."""
    from nnunet_segmamba.tools import benchmark

    seen = {}

    def spy(args):
        seen["found"] = environment.find_trainer("nnUNetTrainerSegMambaV2").__name__
        return 0

    monkeypatch.delenv("nnUNet_extTrainer", raising=False)
    monkeypatch.setattr(benchmark, "main", spy)
    assert main(["benchmark", "--preset", "3d_64", "-tr", "nnUNetTrainerSegMambaV2"]) == 0
    assert seen["found"] == "nnUNetTrainerSegMambaV2"


def test_a_tool_with_a_broken_dependency_leaves_the_others_working(nnunet_folders, monkeypatch, capsys):
    """Without submitit (the sweep's), `env` and `doctor` still run; doctor names the broken tool, and the sweep
    says what is wrong on stderr instead of a traceback."""
    for name in [m for m in sys.modules if m == "submitit" or m.startswith("submitit.")
                 or m.startswith("nnunet_segmamba.tools.sweep")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "submitit", None)  # import submitit fails
    monkeypatch.setenv("nnUNet_extTrainer", environment.trainers_folder())
    assert main(["env"]) == 0
    assert main(["doctor"]) == 1
    out, err = capsys.readouterr()
    assert "[FAIL] tools" in out and "sweep: " in out and "submitit" in out and "problem(s): tools" in err
    assert main(["sweep", "-d", "1", "-tr", "nnUNetTrainer"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("nnunet-segmamba sweep: error: cannot start: ") and "`pip install .`" in err
