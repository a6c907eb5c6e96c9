"""One fold of a sweep: the stock nnUNetv2_train as a picklable submitit job, with a lock per fold folder.

The job decides under the fold's lock whether to skip it (finished), continue it (`--c`) or train it fresh, so no
two trainings of a fold run at once, whichever sweep (or a killed sweep's leftover job) started them.
"""

from __future__ import annotations

import fcntl
import os
import shlex
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO

from submitit.helpers import Checkpointable, DelayedSubmission

from nnunet_segmamba.tools.fold_results import fold_has_results, keep_results
from nnunet_segmamba.tools.processes import end_tree, signals_ignored

LOCK = ".nnunet_segmamba_sweep.lock"
"""In each fold folder: held (flock) by the job training it and by its nnUNetv2_train, so no two trainings of a
fold run at once, whichever sweep (or killed sweep's leftover) started them."""

def fold_state(folder: Path) -> str:
    """'finished' (validated: validation/summary.json, with its checkpoints or kept as results only),
    'interrupted' (a checkpoint nnU-Net's --c continues from, checkpoint_final.pth while validating) or 'new'."""
    if fold_has_results(folder):
        return "finished"
    checkpoints = ("checkpoint_final.pth", "checkpoint_latest.pth")
    return "interrupted" if any((folder / name).is_file() for name in checkpoints) else "new"


@dataclass(frozen=True)
class JobResult:
    """What a fold's job did: trained, resumed, skipped (finished meanwhile), busy (trained elsewhere) or refused
    (its folder cannot be locked)."""

    action: str
    returncode: int
    seconds: float
    command: list[str]
    note: str = ""

    @property
    def status(self) -> str:
        return self.action if self.returncode == 0 else "failed"


@dataclass(frozen=True)
class FoldJob(Checkpointable):
    """One fold's nnUNetv2_train, run by submitit (on Slurm requeued after a time-out, then continued with --c)."""

    label: str
    command: list[str]
    folder: str
    log: str
    env: dict[str, str | None]
    """Changes to the job's environment (None: unset)."""
    results_only: bool = False
    """Once trained and validated, keep the fold's results and delete its checkpoints (`fold_results`)."""
    requeues: int = 0
    """Times Slurm has requeued this job so far."""

    def __call__(self) -> JobResult:
        folder = Path(self.folder)
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / LOCK, "a+") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return JobResult("busy", 1, 0.0, self.command, f"another process trains this fold ({holder(lock)}): "
                                 "wait for it or stop it, then run the sweep again")
            except OSError as error:  # e.g. Lustre mounted without -o flock
                return JobResult("refused", 1, 0.0, self.command, f"cannot lock {folder / LOCK} ({error}): "
                                 "nnUNet_results must be on a filesystem with flock(2) locks (docs/tools.md, Running "
                                 "on Slurm)")
            write_holder(lock, f"job pid {os.getpid()}")
            state = fold_state(folder)
            if state == "finished":  # by another sweep meanwhile, or by this job before Slurm requeued it
                return JobResult("resumed" if self.requeues else "skipped", 0, 0.0, self.command)
            command = [*self.command, "--c"] if state == "interrupted" else self.command
            started = time.time()
            returncode = run_logged(command, self.env, Path(self.log), lock)
            note = ""
            if returncode == 0 and self.results_only and fold_state(folder) == "finished":
                note = f"kept as results, {keep_results(folder) / 2**20:.0f} MiB of checkpoints and predictions deleted"
            return JobResult("resumed" if state == "interrupted" else "trained", returncode, time.time() - started,
                             command, note)

    def checkpoint(self) -> DelayedSubmission:
        """On Slurm's signal before its time limit (or a preemption): the same job, requeued by submitit; it continues
        from nnU-Net's last checkpoint."""
        with open(self.log, "a") as out:
            out.write(f"\n### {time.strftime('%Y-%m-%d %H:%M:%S')} on {socket.gethostname()}: stopped by Slurm (time "
                      "limit or preemption) and requeued; it continues from nnU-Net's last checkpoint (--c)\n")
        return DelayedSubmission(replace(self, requeues=self.requeues + 1))


def holder(lock: IO[str]) -> str:
    """Who holds a fold's lock, as its holder wrote it."""
    lock.seek(0)
    return lock.read().strip() or "pid unknown"


def write_holder(lock: IO[str], process: str) -> None:
    lock.truncate(0)
    lock.write(f"{process} on {socket.gethostname()}")
    lock.flush()


def lock_holder(folder: Path) -> str | None:
    """Who trains the fold now, or None."""
    if not (folder / LOCK).is_file():
        return None
    with open(folder / LOCK, "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return holder(lock)
    return None


def run_logged(command: list[str], changes: dict[str, str | None], log: Path, lock: IO[str]) -> int:
    """Run `command` with its output appended to `log`; it inherits the fold's lock. Its exit code."""
    env = {**os.environ, **{k: v for k, v in changes.items() if v is not None}}
    for name in [k for k, v in changes.items() if v is None]:
        env.pop(name, None)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as out:
        out.write(f"\n### {time.strftime('%Y-%m-%d %H:%M:%S')} on {socket.gethostname()}: {shlex.join(command)}\n")
        out.flush()
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, pass_fds=(lock.fileno(),))
        write_holder(lock, f"pid {process.pid}")
        # The job's process does not stop on SIGTERM (submitit's handler only logs it); ignored rather than handled,
        # the `scontrol requeue` that submitit runs on Slurm's time-limit signal inherits that and survives the
        # SIGTERM which the requeue itself sends to the job's processes
        with signals_ignored(signal.SIGTERM):
            try:
                return process.wait()
            except BaseException:  # cancelled (SIGINT from submitit, Ctrl-C) or timed out on Slurm (SystemExit)
                end_tree(process)
                raise
