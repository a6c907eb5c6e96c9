"""`nnunet-segmamba sweep --cluster slurm` on a real single-node Slurm (Debian's slurmctld, slurmd and munge, started
by tests/slurm_cluster.sh for this file): job arrays, a cancelled job, a requeue after the time limit, and the
submission of GPU jobs. Skipped where the cluster cannot start (not root, packages absent), unless
NNUNET_SEGMAMBA_REQUIRE_SLURM=1 (.ci/run) makes that a failure."""

import argparse
import dataclasses
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from nnunet_segmamba.tools import sweep, sweep_slurm
from tests.folders import preprocessed_tiny_datasets
from tests.processes import mentioning, wait_for

pytestmark = pytest.mark.e2e
BIN = Path(sys.executable).parent
CLUSTER = Path(__file__).with_name("slurm_cluster.sh")
DATASETS = {911: "SlurmA", 912: "SlurmB"}
TRAINERS = ["nnUNetTrainer", "nnUNetTrainerSegMambaV2"]
SLOW_TRAINER = textwrap.dedent('''
    """A training that needs more than one job of `--slurm-time-min 2`: 20 epochs of one iteration and a 4 s pause
    (about 100 s however busy the CPUs are), a checkpoint after every epoch."""
    import time

    import torch
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer


    class nnUNetTrainerSlow(nnUNetTrainer):
        def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                     device: torch.device = torch.device("cuda")):
            super().__init__(plans, configuration, fold, dataset_json, device)
            self.num_epochs, self.num_iterations_per_epoch, self.num_val_iterations_per_epoch = 20, 1, 1
            self.save_every = 1

        def on_train_epoch_start(self):
            super().on_train_epoch_start()
            time.sleep(4)
''')


def cannot_start() -> str | None:
    """Why this machine cannot run the test cluster, or None."""
    if os.geteuid() != 0:
        return "the test cluster's daemons (slurmctld, slurmd, munged) need root"
    path = f"{os.environ['PATH']}{os.pathsep}/usr/sbin{os.pathsep}/sbin"
    missing = [name for name in ("slurmctld", "slurmd", "munged", "sbatch") if not shutil.which(name, path=path)]
    if missing:
        return f"Slurm's Debian packages are not installed ({', '.join(missing)}): run tests/slurm_cluster.sh install"
    return None


@pytest.fixture(scope="module")
def slurm(tmp_path_factory) -> dict[str, str]:
    """A single-node Slurm cluster for this file's tests, stopped afterwards (also when they fail)."""
    if reason := cannot_start():
        if os.environ.get("NNUNET_SEGMAMBA_REQUIRE_SLURM") == "1":
            pytest.fail(f"NNUNET_SEGMAMBA_REQUIRE_SLURM=1 but {reason}")
        pytest.skip(reason)
    folder = tmp_path_factory.mktemp("slurm")
    try:
        started = subprocess.run([str(CLUSTER), "start", str(folder)], capture_output=True, text=True, timeout=120)
        assert started.returncode == 0, started.stdout + started.stderr
        yield {"SLURM_CONF": str(folder / "slurm.conf")}
    finally:
        subprocess.run([str(CLUSTER), "stop", str(folder)], timeout=300)


@pytest.fixture(scope="module")
def nnunet(slurm, tmp_path_factory) -> dict[str, str]:
    """Two tiny datasets, preprocessed; the sweeps' environment: the cluster, and a folder with the slow trainer."""
    root = tmp_path_factory.mktemp("nnunet")
    trainers = root / "trainers"
    trainers.mkdir()
    (trainers / "slow_trainer.py").write_text(SLOW_TRAINER)
    return {**preprocessed_tiny_datasets(root, DATASETS), **slurm, "nnUNet_extTrainer": str(trainers)}


def start_sweep(arguments: list[str], env: dict[str, str], output: Path) -> subprocess.Popen:
    """`nnunet-segmamba sweep ARGUMENTS --cluster slurm -device cpu -o OUTPUT`, its output to OUTPUT.txt."""
    with open(f"{output}.txt", "w") as out:
        return subprocess.Popen([str(BIN / "nnunet-segmamba"), "sweep", *arguments, "-device", "cpu", "--cluster",
                                 "slurm", "--slurm-cpus-per-job", "1", "-o", str(output)], env=env, stdout=out,
                                stderr=subprocess.STDOUT, text=True)


def finished_output(process: subprocess.Popen, output: Path, seconds: float = 900) -> str:
    process.wait(seconds)
    return Path(f"{output}.txt").read_text()


@pytest.fixture(scope="module")
def requeued_sweep(nnunet, tmp_path_factory) -> tuple[subprocess.Popen, Path]:
    """One fold of the slow trainer with a 2-minute time limit, submitted before the other sweep's jobs and sharing
    the cluster with them (it pauses most of the time): Slurm signals it after 60-90 s (a quarter of the limit
    before it, and its check runs every 30 s), submitit requeues it, and it continues with --c."""
    output = tmp_path_factory.mktemp("requeue") / "sweep"
    process = start_sweep(["-d", "911", "-tr", "nnUNetTrainerSlow", "-f", "2", "--slurm-time-min", "2"], nnunet,
                          output)
    wait_for(lambda: "queued   " in Path(f"{output}.txt").read_text() or process.poll() is not None, 300,
             "the time-limited job submitted")
    yield process, output
    if process.poll() is None:
        process.kill()


def label(dataset: int, trainer: str, fold: int) -> str:
    return f"Dataset{dataset}_{DATASETS[dataset]} {trainer}__nnUNetPlans__3d_fullres fold {fold}"


def fold_log(output: Path, dataset: int, trainer: str, fold: int) -> Path:
    model = f"{trainer}__nnUNetPlans__3d_fullres"
    return output / "logs" / f"Dataset{dataset}_{DATASETS[dataset]}" / f"{model}_fold{fold}.log"


def test_sweep_trains_every_fold_as_a_job_array_and_a_cancelled_job_is_trained_by_the_rerun(nnunet, requeued_sweep,
                                                                                         tmp_path):
    """2 datasets x 2 trainers x 2 folds through sbatch as one job array; one job is cancelled with scancel while it
    trains: it is reported with its log and the command to rerun it, nothing of it keeps running, and the re-run
    trains only that fold; compare then has every cell."""
    output = tmp_path / "sweep"
    arguments = ["-d", *map(str, DATASETS), "-tr", *TRAINERS, "-f", "0", "1", "--epochs", "1", "--iterations", "2"]
    process = start_sweep(arguments, nnunet, output)
    running = wait_for(lambda: re.search(r"running  (.+?): Slurm job (\S+) on", Path(f"{output}.txt").read_text()),
                       600, "a fold's job running")
    cancelled, job_id = running.group(1), running.group(2)
    dataset, trainer, fold = int(cancelled[7:10]), cancelled.split()[1].split("__")[0], int(cancelled.split()[-1])
    log = fold_log(output, dataset, trainer, fold)
    wait_for(lambda: log.is_file() and "Epoch 0" in log.read_text(), 300, f"{cancelled} training")
    subprocess.run(["scancel", job_id], env=nnunet, check=True)
    text = finished_output(process, output)
    print(text)
    assert process.returncode == 1, text
    failed = re.search(rf"FAILED   {re.escape(cancelled)}: (.*)\n", text)
    assert failed and str(log) in failed.group(1) and ("CANCELLED" in failed.group(1) or "SIGTERM" in failed.group(1))
    assert f"rerun: nnUNet_extTrainer=" in text and "Summary: 7 trained, 0 resumed, 0 skipped, 1 failed" in text
    assert not mentioning(f"{DATASETS[dataset]} 3d_fullres {fold} -tr {trainer}")  # no training left behind
    submissions = list((output / "submitit").glob("*_submission.sh"))
    assert len(submissions) == 1 and "#SBATCH --array=0-7%8" in submissions[0].read_text()  # one array of 8 jobs

    rerun = start_sweep(arguments, nnunet, output)
    text = finished_output(rerun, output)
    print(text)
    assert rerun.returncode == 0, text
    assert re.search(r"Summary: [01] trained, [01] resumed, 7 skipped, 0 failed", text), text
    assert re.search(rf"(trained|resumed)  {re.escape(cancelled)}: in ", text), text
    report = json.loads((output / "compare" / "compare.json").read_text())
    cells = {(row["dataset"], row["method"]): row["folds"] for row in report["overview"] if row["split"] == "cv"}
    assert cells == {(f"Dataset{i}_{n}", f"{t}_e1i2"): 2 for i, n in DATASETS.items() for t in TRAINERS}
    assert report["missing"] == []


def test_a_job_past_its_time_limit_is_requeued_and_continues_with_c(nnunet, requeued_sweep):
    process, output = requeued_sweep
    text = finished_output(process, output)
    print(text)
    assert process.returncode == 0, text
    fold = label(911, "nnUNetTrainerSlow", 2)
    assert f"requeued {fold}: Slurm job" in text and f"resumed  {fold}: in " in text, text
    runs = fold_log(output, 911, "nnUNetTrainerSlow", 2).read_text().split("\n### ")[1:]
    assert "stopped by Slurm (time limit or preemption) and requeued" in runs[1], runs[1][:300]
    assert runs[0].split("\n")[0].endswith("-device cpu") and runs[2].split("\n")[0].endswith("-device cpu --c")
    submitit_log = "".join(path.read_text() for path in (output / "submitit").glob("*_log.*"))
    assert "Caught signal SIGUSR2" in submitit_log and "this job is timed-out" in submitit_log
    assert "Requeued job" in submitit_log
    folder = Path(nnunet["nnUNet_results"]) / "Dataset911_SlurmA" / "nnUNetTrainerSlow__nnUNetPlans__3d_fullres"
    folder = folder / "fold_2"
    nnunet_logs = sorted(folder.glob("training_log_*.txt"))  # one per nnUNetv2_train
    first_epochs = [re.findall(r": Epoch (\d+)", log.read_text())[:1] for log in nnunet_logs]
    assert first_epochs[0] == ["0"] and int(first_epochs[1][0]) > 0, first_epochs  # continued from a checkpoint
    assert (folder / "checkpoint_final.pth").is_file() and (folder / "validation" / "summary.json").is_file()


def test_the_partition_time_limit_and_a_refused_submission_are_errors(nnunet, tmp_path):
    run = [str(BIN / "nnunet-segmamba"), "sweep", "-d", "911", "-tr", "nnUNetTrainer", "-f", "0", "--cluster",
           "slurm", "-o", str(tmp_path / "sweep")]
    too_long = subprocess.run([*run, "-device", "cpu", "--slurm-time-min", "45"], env=nnunet, capture_output=True,
                              text=True, timeout=300)
    assert too_long.returncode == 2 and "exceeds partition debug's time limit of 30 minutes" in too_long.stderr
    no_gpu = subprocess.run([*run, "-device", "cuda"], env=nnunet, capture_output=True, text=True, timeout=300)
    assert no_gpu.returncode == 1, no_gpu.stdout + no_gpu.stderr
    assert "nnunet-segmamba sweep: error: the scheduler refused the jobs" in no_gpu.stderr, no_gpu.stderr


@pytest.mark.skipif(not shutil.which("srun"), reason="submitit's Slurm executor needs Slurm's srun on PATH")
def test_gpu_jobs_ask_for_their_gpus_and_cpus_and_train_with_nnunets_multi_gpu(tmp_path, monkeypatch):
    """What a 2-GPU fold submits (written, not run): its #SBATCH lines, srun's CPUs, nnU-Net's -num_gpus 2 and
    augmentation workers."""
    monkeypatch.setattr(sweep_slurm, "partition_time_limit", lambda partition: (partition or "gpu", 2 * 24 * 60))
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "results"))
    monkeypatch.delenv("nnUNet_n_proc_DA", raising=False)
    monkeypatch.delenv("nnUNet_def_n_proc", raising=False)
    args = argparse.Namespace(slurm_partition="gpu", slurm_time_min=None, slurm_gpus_per_job=2,
                              slurm_cpus_per_job=None, slurm_mem_gb=64, slurm_array_parallelism=4,
                              slurm_max_requeues=10, cluster="slurm", jobs=1)
    request = sweep_slurm.request(args, "cuda")
    assert (request.cpus, request.augmentation_workers, request.time_min) == (24, 11, 24 * 60)
    grid = sweep.Grid(["Dataset911_SlurmA"], {"nnUNetTrainer": object}, ["nnUNetPlans"], ["3d_fullres"], ["0"],
                      "nnUNetTrainer", {}, "cuda", tmp_path / "sweep", request)
    env = sweep.job_environment(args, grid, None)
    job = sweep.fold_jobs(grid, env, False)[0]
    assert job.command[-4:] == ["-device", "cuda", "-num_gpus", "2"] and env["nnUNet_n_proc_DA"] == "11"
    assert env["nnUNet_def_n_proc"] == "8"  # nnU-Net's default: the job's 24 CPUs allow it
    text = sweep.make_executor(grid)._executor._make_submission_file_text("COMMAND", "uid")
    lines = set(text.splitlines())
    assert {"#SBATCH --gpus-per-node=2", "#SBATCH --cpus-per-task=24", "#SBATCH --mem=64GB", "#SBATCH --time=1440",
            "#SBATCH --partition=gpu", "#SBATCH --signal=USR2@90", "#SBATCH --nodes=1"} <= lines, text
    assert re.search(r"^srun .*--cpus-per-task 24 COMMAND$", text, re.M), text
    assert pickle.loads(pickle.dumps(job)) == job  # what submitit sends to the job

    one_gpu = sweep_slurm.request(argparse.Namespace(**{**vars(args), "slurm_gpus_per_job": None,
                                                        "slurm_cpus_per_job": 8}), "cuda")
    assert (one_gpu.gpus, one_gpu.cpus, one_gpu.augmentation_workers) == (1, 8, 7)
    assert sweep.multi_gpu(dataclasses.replace(grid, slurm=one_gpu)) == []
    with pytest.raises(ValueError, match="needs -device cuda"):
        sweep_slurm.request(args, "cpu")


def test_slurm_time_formats():
    assert [sweep_slurm.minutes(t) for t in ("30", "30:00", "2:00:00", "1-00:00:00", "2-12", "infinite")] == \
           [30, 30, 120, 1440, 3600, None]
