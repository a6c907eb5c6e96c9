"""`nnunet-segmamba sweep`: trainers x datasets x folds through submitit, killed and resumed, then compared."""

import fcntl
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from nnunet_segmamba.cli import main
from nnunet_segmamba.tools.environment import ext_trainer_folders
from nnunet_segmamba.tools.fold_results import merge_results, pack
from nnunet_segmamba.tools.sweep_jobs import LOCK, FoldJob, fold_state, lock_holder
from tests.folders import preprocessed_tiny_datasets
from tests.processes import STOP_SIGNALS, mentioning, one_per_stop_signal, stop_with, wait_for

BIN = Path(sys.executable).parent
DATASETS = {901: "SweepA", 902: "SweepB"}
TRAINERS = ["nnUNetTrainer", "nnUNetTrainerSegMambaV2"]
GRID = ["-d", *map(str, DATASETS), "-tr", *TRAINERS, "-f", "0", "1", "--epochs", "1", "--iterations", "2",
        "--jobs", "2", "-device", "cpu"]


@pytest.fixture(scope="module")
def nnunet(tmp_path_factory) -> dict[str, str]:
    """Two tiny generated datasets, preprocessed; the environment of the sweep's commands."""
    return preprocessed_tiny_datasets(tmp_path_factory.mktemp("nnunet"), DATASETS)


def sweep_command(output: Path) -> list[str]:
    return [str(BIN / "nnunet-segmamba"), "sweep", *GRID, "--keep", "results", "-o", str(output)]


def fold_folders(env: dict[str, str]) -> list[Path]:
    results = Path(env["nnUNet_results"])
    return [results / f"Dataset{i}_{name}" / f"{trainer}_e1i2__nnUNetPlans__3d_fullres" / f"fold_{fold}"
            for i, name in DATASETS.items() for trainer in TRAINERS for fold in (0, 1)]


def label(folder: Path) -> str:
    return f"{folder.parents[1].name} {folder.parent.name} fold {folder.name.split('_')[1]}"


def kill_while_validating(command: list[str], env: dict[str, str], folds: list[Path], log: Path) -> None:
    """Start the sweep and SIGKILL its process group once a fold is finished and another one is validating
    (checkpoint_final.pth written, validation/summary.json not yet): deterministic for --c."""
    with open(log, "w") as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 900
        while time.time() < deadline and process.poll() is None:
            states = [fold_state(f) for f in folds]
            if "finished" in states and "interrupted" in states:
                break
            time.sleep(0.05)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    assert process.returncode == -signal.SIGKILL, log.read_text()[-3000:]


@pytest.mark.e2e
def test_bad_arguments_are_one_line_errors_and_write_nothing(nnunet, tmp_path, monkeypatch, capsys):
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.setenv(name, nnunet[name])
    monkeypatch.setenv("nnUNet_extTrainer", "")  # restored afterwards: the sweep sets it for its own lookups
    output = tmp_path / "sweep"
    cases = {("-d", "999", "-tr", "nnUNetTrainer"): "unknown dataset '999'",
             ("-d", "901", "-tr", "nnUNetTrainerNope"): "unknown trainer 'nnUNetTrainerNope'",
             ("-d", "901", "-tr", "nnUNetTrainer", "-f", "5"): "fold '5' does not exist: Dataset901_SweepA has folds",
             ("-d", "901", "-tr", "nnUNetTrainer", "-p", "nnUNetPlansX"): "has no",
             ("-d", "901", "-tr", "nnUNetTrainer", "-c", "2d_fancy"): "has no configuration '2d_fancy'"}
    for arguments, message in cases.items():
        assert main(["sweep", *arguments, "-o", str(output)]) == 2, arguments
        error = capsys.readouterr().err
        assert error.startswith("nnunet-segmamba sweep: error: ") and message in error, error
        assert error.count("\n") == 1, error
    monkeypatch.delenv("nnUNet_results")
    assert main(["sweep", "-d", "901", "-tr", "nnUNetTrainer", "-o", str(output)]) == 2
    assert "nnUNet_results is not set" in capsys.readouterr().err
    assert not output.exists() and not any(Path(nnunet["nnUNet_results"]).iterdir())
    assert not list(Path(nnunet["nnUNet_preprocessed"]).glob("*/splits_final.json"))


@pytest.mark.e2e
def test_sweep_killed_then_resumed_compares_every_fold(nnunet, tmp_path):
    """2 datasets x 2 trainers x 2 folds, 2 at once, kept as results: SIGKILL of the whole sweep mid-way; the same
    command again skips the finished folds, continues the one that was validating with --c and trains the rest;
    `compare` gets every fold. The folds' results, packed and merged into an empty nnUNet_results, give the same
    comparison."""
    folds, output = fold_folders(nnunet), tmp_path / "sweep"
    started = time.time()
    kill_while_validating(sweep_command(output), nnunet, folds, tmp_path / "killed.log")
    killed_after = time.time() - started
    deadline = time.time() + 60  # killed processes take a moment to exit and release their fold's lock
    while (held := [lock_holder(f) for f in folds if lock_holder(f)]) and time.time() < deadline:
        time.sleep(0.1)
    assert not held  # nothing of the killed sweep trains on
    finished = {f: summary_file(f).stat().st_mtime_ns for f in folds if fold_state(f) == "finished"}
    validating = [f for f in folds if fold_state(f) == "interrupted"]
    assert finished and validating

    result = subprocess.run(sweep_command(output), env=nnunet, capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-3000:]
    print(f"killed after {killed_after:.0f} s, re-run {time.time() - started - killed_after:.0f} s\n{result.stdout}")
    for folder, mtime in finished.items():
        assert f"skipped  {label(folder)}: finished earlier" in result.stdout
        assert summary_file(folder).stat().st_mtime_ns == mtime  # not retrained
    for folder in validating:
        assert f"started  {label(folder)}: continues (--c)" in result.stdout
        assert f"resumed  {label(folder)}: in " in result.stdout
        log = output / "logs" / folder.parents[1].name / f"{folder.parent.name}_{folder.name.replace('_', '')}.log"
        assert log.read_text().split("\n### ")[-1].split("\n")[0].endswith(" --c")
    trained = len(folds) - len(finished) - len(validating)
    assert f"Summary: {trained} trained, {len(validating)} resumed, {len(finished)} skipped, 0 failed" in result.stdout
    assert all(fold_state(f) == "finished" for f in folds)
    for folder in set(folds) - set(finished):  # kept as results by the re-run
        assert not list(folder.glob("*.pth")) and not list(folder.glob("validation/*.nii.gz"))
        assert f"{label(folder)}: in " in result.stdout and "kept as results" in result.stdout

    report = json.loads((output / "compare" / "compare.json").read_text())
    cells = {(row["dataset"], row["method"]): row["folds"] for row in report["overview"] if row["split"] == "cv"}
    assert cells == {(f"Dataset{i}_{n}", f"{t}_e1i2"): 2 for i, n in DATASETS.items() for t in TRAINERS}
    assert report["missing"] == [] and report["settings"]["baseline"] == "nnUNetTrainer_e1i2"
    assert "nnUNet_extTrainer=" in result.stdout and str(output / "trainers") in result.stdout

    archive, elsewhere = tmp_path / "results.tar.gz", tmp_path / "elsewhere"
    assert pack(Path(nnunet["nnUNet_results"]), folds, archive) == len(folds)
    assert len(merge_results(archive, elsewhere)) == len(folds)
    env = {**nnunet, "nnUNet_results": str(elsewhere),
           "nnUNet_extTrainer": ext_trainer_folders(str(output / "trainers"))}
    compared = subprocess.run([str(BIN / "nnunet-segmamba"), "compare", "-d", *map(str, DATASETS), "-tr",
                               *(f"{t}_e1i2" for t in TRAINERS), "-f", "0", "1", "--baseline", "nnUNetTrainer_e1i2",
                               "-o", str(tmp_path / "compared")],
                              env=env, capture_output=True, text=True, timeout=600)
    assert compared.returncode == 0, compared.stdout[-3000:] + compared.stderr[-3000:]
    assert json.loads((tmp_path / "compared" / "compare.json").read_text())["overview"] == report["overview"]


def summary_file(fold: Path) -> Path:
    return fold / "validation" / "summary.json"


@pytest.mark.e2e
def test_stop_signals_end_the_trainings_and_their_workers(nnunet, tmp_path):
    """SIGTERM, SIGHUP or SIGINT to the sweep alone (`kill`, a closed terminal, a scheduler) cancels its job:
    nnUNetv2_train and its augmentation workers end before the sweep does. A sweep per signal, side by side."""
    folds = dict(zip(STOP_SIGNALS, "234"))

    def command(output: Path) -> list[str]:
        return [str(BIN / "nnunet-segmamba"), "sweep", "-d", "901", "-tr", "nnUNetTrainer", "-f",
                folds[signal.Signals[output.name]], "--epochs", "100", "--iterations", "50", "-device", "cpu", "-o",
                str(output)]

    with one_per_stop_signal(tmp_path, command, nnunet) as sweeps:
        for signum, (output, process) in sweeps.items():
            wait_for(lambda: [p for p, command in mentioning(str(output)).items() if "nnUNetv2_train" in command][2:],
                     600, "nnUNetv2_train and at least two augmentation workers")
            assert "] cancel " in stop_with(signum, process, output)


def fake_job(root: Path, code: str, name: str = "fold_0") -> FoldJob:
    """A fold's job whose 'nnUNetv2_train' is `python -c code ARGS`."""
    return FoldJob(name, [sys.executable, "-c", code, "train"], str(root / name), str(root / f"{name}.log"), {})


def test_job_continues_a_checkpoint_skips_a_finished_fold_and_refuses_a_busy_one(tmp_path):
    job = fake_job(tmp_path, "import sys; print('args', sys.argv[1:])")
    assert (job().action, fold_state(tmp_path / "fold_0")) == ("trained", "new")
    (tmp_path / "fold_0" / "checkpoint_latest.pth").touch()
    resumed = job()
    assert (resumed.action, resumed.returncode, resumed.command[-1]) == ("resumed", 0, "--c")
    assert "args ['train', '--c']" in (tmp_path / "fold_0.log").read_text()
    (tmp_path / "fold_0" / "checkpoint_final.pth").touch()
    (tmp_path / "fold_0" / "validation").mkdir()
    (tmp_path / "fold_0" / "validation" / "summary.json").write_text("{}")
    assert job().action == "skipped"
    requeued = job.checkpoint().function  # what Slurm runs after the time limit: finished by the job's earlier run
    assert (requeued.requeues, requeued().action) == (1, "resumed")
    assert "stopped by Slurm (time limit or preemption) and requeued" in (tmp_path / "fold_0.log").read_text()
    with open(tmp_path / "fold_0" / LOCK, "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        lock.write("pid 123 on elsewhere")
        lock.flush()
        busy = job()
    assert (busy.status, busy.returncode) == ("failed", 1) and "pid 123 on elsewhere" in busy.note
    assert fake_job(tmp_path, "import sys; sys.exit(3)", "fold_1")().status == "failed"


def test_training_holds_the_fold_lock_while_it_runs(tmp_path):
    """The lock passes to nnUNetv2_train itself: it outlives a killed job process."""
    job = fake_job(tmp_path, "import time; time.sleep(3)")
    thread = threading.Thread(target=job)
    thread.start()
    deadline = time.time() + 30
    while not (holder := lock_holder(tmp_path / "fold_0")) and time.time() < deadline:
        time.sleep(0.05)
    assert holder and holder.startswith(("pid ", "job pid "))
    thread.join()
    assert lock_holder(tmp_path / "fold_0") is None


def test_what_the_job_runs_while_training_survives_the_requeues_sigterm(tmp_path):
    """On Slurm's time-limit signal submitit runs `scontrol requeue` from the job's process while nnUNetv2_train
    trains; the requeue sends SIGTERM to all the job's processes, which must not kill scontrol before it returns."""
    started_meanwhile = []

    def time_limit(signum, frame):  # as submitit's handler: a command run from the job's process
        started_meanwhile.append(subprocess.run([sys.executable, "-c", "import signal; print(signal.getsignal("
                                                 "signal.SIGTERM) == signal.SIG_IGN)"], capture_output=True,
                                                text=True).stdout.strip())

    previous = signal.signal(signal.SIGUSR2, time_limit)
    try:
        threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGUSR2)).start()
        assert fake_job(tmp_path, "import time; time.sleep(3)")().status == "trained"
    finally:
        signal.signal(signal.SIGUSR2, previous)
    assert started_meanwhile == ["True"]  # SIGTERM ignored


CANCELLED_SWEEP = textwrap.dedent("""
    import sys
    from pathlib import Path
    import submitit
    from nnunet_segmamba.tools import sweep_runner
    from nnunet_segmamba.tools.processes import stop_signals_interrupt
    from nnunet_segmamba.tools.sweep_jobs import FoldJob
    root = Path(sys.argv[1])
    jobs = [FoldJob(f"fold {i}", [sys.executable, "-c", "import time; time.sleep(300)"], str(root / f"fold_{i}"),
                          str(root / f"{i}.log"), {}) for i in range(3)]
    executor = submitit.AutoExecutor(folder=root / "submitit", cluster="local")
    executor.update_parameters(timeout_min=60)
    with stop_signals_interrupt():
        try:
            sweep_runner.run_jobs(executor, jobs, 2, True, {"nnUNet_extTrainer": ""}, sweep_runner.Progress())
        except KeyboardInterrupt:
            sys.exit(130)
""")


def test_sigterm_cancels_the_jobs_in_flight_and_their_trainings(tmp_path):
    """submitit's local executor leaves its jobs running when the submitting process ends: the sweep cancels them
    on SIGTERM (as on Ctrl-C) and waits until their trainings are gone; also when started with SIGINT ignored (as
    a script's background job is), which its jobs' processes would inherit, and submitit cancels with SIGINT."""
    process = subprocess.Popen([sys.executable, "-c", CANCELLED_SWEEP, str(tmp_path)], start_new_session=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        deadline = time.time() + 60
        while time.time() < deadline and not all((lock_holder(tmp_path / f"fold_{i}") or "").startswith("pid ")
                                                  for i in range(2)):
            time.sleep(0.1)
        trainings = [int(lock_holder(tmp_path / f"fold_{i}").split()[1]) for i in range(2)]
        process.send_signal(signal.SIGTERM)
        output = process.communicate(timeout=90)[0]
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 130 and "Traceback" not in output, output
    assert output.count("] cancel ") == 2 and "fold 2" not in output, output  # at most 2 in flight: the third never ran
    assert not any(map(alive, trainings)) and not any(lock_holder(tmp_path / f"fold_{i}") for i in range(3))


def alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_time_limit_starts_no_fold_that_cannot_finish_and_stops_those_in_flight(tmp_path):
    """--time-limit: jobs of ~10 s, one at a time, 18 s: the first runs; the second would end after the limit, so
    neither it nor the third starts (whatever submitit's start-up takes below 8 s: CI's loaded 2 cores took over 4
    s). Two at a time, 30 s, jobs of 300 s: both start (nothing finished yet says how long a fold takes), are
    reported stopped at the limit, and their trainings are gone."""
    import submitit

    from nnunet_segmamba.tools import sweep_runner

    executor = submitit.AutoExecutor(folder=tmp_path / "submitit", cluster="local")
    executor.update_parameters(timeout_min=60)
    short = [fake_job(tmp_path, "import time; time.sleep(10)", f"short_{i}") for i in range(3)]
    results = sweep_runner.run_jobs(executor, short, 1, True, {"nnUNet_extTrainer": ""}, sweep_runner.Progress(),
                                    time.time() + 18)
    assert [(job.label, result.status) for job, result in results] == [
        ("short_0", "trained"), ("short_1", "not run"), ("short_2", "not run")]

    long = [fake_job(tmp_path, "import time; time.sleep(300)", f"long_{i}") for i in range(2)]
    started = time.time()
    results = sweep_runner.run_jobs(executor, long, 2, True, {"nnUNet_extTrainer": ""}, sweep_runner.Progress(),
                                    started + 30)
    assert sorted(result.status for _, result in results) == ["stopped", "stopped"]
    assert time.time() - started < 90  # not the jobs' 300 s
    assert not any(lock_holder(tmp_path / f"long_{i}") for i in range(2))


def test_cancel_ends_a_training_orphaned_by_its_killed_job(tmp_path):
    """A local job's controller SIGKILLs the job one second after passing on the cancel's SIGINT; on a loaded machine
    the job had not yet ended its training, which ran on, holding the fold's lock (seen in CI). Here the job is
    killed outright while training: cancel ends the orphaned training all the same."""
    import submitit

    from nnunet_segmamba.tools import sweep_runner

    executor = submitit.AutoExecutor(folder=tmp_path / "submitit", cluster="local")
    executor.update_parameters(timeout_min=60)
    job = fake_job(tmp_path, "import time; time.sleep(300)")
    handle = executor.submit(job)
    wait_for(lambda: (lock_holder(tmp_path / "fold_0") or "").startswith("pid "), 60, "the training")
    training = int(lock_holder(tmp_path / "fold_0").split()[1])  # "pid N on HOST"
    os.kill(int(Path(f"/proc/{training}/stat").read_text().rsplit(")", 1)[1].split()[1]), signal.SIGKILL)  # its job
    wait_for(handle.done, 30, "the job's controller to end")
    assert alive(training) and lock_holder(tmp_path / "fold_0")
    sweep_runner.cancel([(job, handle)], True, sweep_runner.Progress())
    assert not alive(training) and not lock_holder(tmp_path / "fold_0")


def test_local_jobs_share_the_cpus_for_augmentation_and_validation(monkeypatch):
    """--jobs folds at once split the CPUs: nnU-Net's augmentation workers and its validation's export and scoring
    processes (at most nnU-Net's default of 8), unless the user set them."""
    import argparse

    from nnunet_segmamba.tools.sweep import job_environment

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    for name in ("nnUNet_n_proc_DA", "nnUNet_def_n_proc"):
        monkeypatch.delenv(name, raising=False)
    shares = {jobs: job_environment(argparse.Namespace(cluster="local", jobs=jobs), None, None)
              for jobs in (1, 4, 14)}
    assert {jobs: (env["nnUNet_n_proc_DA"], env["nnUNet_def_n_proc"]) for jobs, env in shares.items()} == {
        1: ("16", "8"), 4: ("4", "4"), 14: ("1", "1")}
    monkeypatch.setenv("nnUNet_def_n_proc", "3")
    assert job_environment(argparse.Namespace(cluster="local", jobs=14), None, None)["nnUNet_def_n_proc"] == "3"
