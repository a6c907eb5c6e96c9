"""Running a sweep's fold jobs through submitit: at most `cap` in flight, one progress line per event, a failed
fold's log tail and rerun command, and on Ctrl-C (or SIGTERM/SIGHUP, which `nnunet-segmamba` turns into it) the
jobs in flight cancelled."""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from nnunet_segmamba.tools.processes import end, with_environment
from nnunet_segmamba.tools.sweep_jobs import FoldJob, JobResult, fold_state, lock_holder
from nnunet_segmamba.tools.sweep_slurm import SlurmQueue

if TYPE_CHECKING:
    import submitit

POLL_SECONDS = 0.5
LEFTOVER_WAIT_SECONDS = 15.0
"""How long cancelled local jobs get to end their trainings themselves (end_tree's grace is 10 s)."""
TAIL_LINES = 15


class SubmissionFailed(Exception):
    """The scheduler refused the jobs (sbatch's message is on stderr)."""


class Progress:
    """One line per event, with the time since the sweep started."""

    def __init__(self) -> None:
        self.started = time.time()

    def line(self, event: str, job: FoldJob, details: str) -> None:
        print(f"[{time.time() - self.started:6.0f} s] {event:<8} {job.label}: {details}", flush=True)


def tail(path: str, lines: int = TAIL_LINES) -> str:
    try:
        return "".join(Path(path).read_text(errors="replace").splitlines(keepends=True)[-lines:])
    except OSError:
        return "(no log)\n"


def job_result(job: FoldJob, handle: submitit.Job, queue: SlurmQueue | None) -> JobResult:
    """What the job returned, or why it has no result (killed, cancelled, out of memory, node lost, requeued too
    often), with submitit's log."""
    if queue is not None and not handle.paths.result_pickle.exists():
        return JobResult("failed", 1, 0.0, job.command, f"Slurm job {handle.job_id} ended without a result "
                         f"({queue.state(handle)}); submitit's log: {handle.paths.stderr}")
    try:
        return handle.result()
    except Exception as error:  # noqa: BLE001 - the job itself died: submitit says why
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return JobResult("failed", 1, 0.0, job.command, f"the job did not complete ({reason[:200]}); submitit's log: "
                         f"{handle.paths.stderr}")


def finish(job: FoldJob, handle: submitit.Job, env: dict[str, str | None], progress: Progress,
           queue: SlurmQueue | None) -> JobResult:
    """The finished job's result, reported (a failure with its log's tail and the command to rerun)."""
    result = job_result(job, handle, queue)
    if result.status != "failed":
        progress.line(result.status, job, f"in {result.seconds:.0f} s; {result.note + '; ' if result.note else ''}"
                                          f"log {job.log}")
        return result
    if result.action not in ("trained", "resumed"):
        code = result.note
    elif result.returncode < 0:
        code = f"stopped by {signal_name(-result.returncode)}"
    else:
        code = f"exit code {result.returncode}"
    progress.line("FAILED", job, f"{code}; log {job.log}")
    if result.action in ("trained", "resumed"):
        print("".join(f"    | {line}" for line in tail(job.log).splitlines(keepends=True)), end="")
    print(f"    rerun: nnUNet_extTrainer={shlex.quote(env['nnUNet_extTrainer'])} {shlex.join(result.command)}\n"
          f"    (or run this sweep again: finished folds are skipped)", flush=True)
    return result


def cancel(running: list[tuple[FoldJob, submitit.Job]], local: bool, progress: Progress) -> None:
    """Cancel the jobs in flight; locally, wait until their controllers have ended and their folds' locks are free,
    end what is left of them after LEFTOVER_WAIT_SECONDS, and say which folds are still being trained."""
    for job, handle in running:
        handle.cancel(check=False)
        progress.line("cancel", job, f"log {job.log}")
    if not local:
        return
    deadline = time.time() + LEFTOVER_WAIT_SECONDS
    while time.time() < deadline and any(not handle.done() or lock_holder(Path(job.folder)) for job, handle in running):
        time.sleep(0.2)
    for job, handle in running:
        end_leftovers(handle)
        if still := lock_holder(Path(job.folder)):
            print(f"    {job.label} is still being trained ({still}): stop it before running the sweep again",
                  file=sys.stderr)


def end_leftovers(handle: submitit.Job) -> None:
    """End what still runs of a cancelled local job. Its controller SIGKILLs the job's process one second after
    passing on the SIGINT: on a loaded machine that can come before the job has ended its training, which then runs
    on, orphaned, holding the fold's lock. Every process the job started carries its id in its environment."""
    end(with_environment("SUBMITIT_LOCAL_JOB_ID", str(handle.job_id)))


@contextlib.contextmanager
def stderr_to(path: Path | None) -> Iterator[None]:
    """This process's stderr (file descriptor 2) appended to `path` (None: unchanged) for the block: the local job
    controllers submitit starts inherit it, and print tracebacks there when they are cancelled."""
    if path is None:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as log:
        os.dup2(log.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def submit(executor: submitit.Executor, batch: list[FoldJob], local: bool) -> list[submitit.Job]:
    """Submit the batch at once (on Slurm: one job array)."""
    from submitit.core.utils import FailedJobError

    try:
        with stderr_to(Path(executor.folder) / "controllers.log" if local else None), executor.batch():
            return [executor.submit(job) for job in batch]  # submitted at the batch's end
    except FailedJobError as error:
        raise SubmissionFailed(f"the scheduler refused the jobs ({str(error).strip() or 'see above'}); check the "
                               "--slurm-* options") from None


def run_jobs(executor: submitit.Executor, jobs: list[FoldJob], cap: int, local: bool, env: dict[str, str | None],
             progress: Progress, deadline: float | None = None) -> list[tuple[FoldJob, JobResult]]:
    """Submit the jobs, at most `cap` in flight; their results as they finish (on Slurm also when they start or are
    requeued). With a `deadline` (a time.time()), no job starts that would not finish by then, judged by the longest
    job finished so far ('not run'), and the jobs in flight at the deadline are cancelled ('stopped')."""
    pending, running, results = list(jobs), [], []
    queue = None if local else SlurmQueue()

    def ended(handle: submitit.Job) -> bool:
        return handle.done() if queue is None else queue.done(handle)

    try:
        while pending or running:
            if deadline is not None and pending and time.time() + longest(results) > deadline:
                for job in pending:
                    progress.line("not run", job, "the time limit leaves too little time for it")
                results += [(job, JobResult("not run", 0, 0.0, job.command)) for job in pending]
                pending = []
            if deadline is not None and running and time.time() > deadline:
                cancel(running, local, progress)
                results += [(job, JobResult("stopped", 0, 0.0, job.command)) for job, _ in running]
                break
            batch, pending = pending[:cap - len(running)], pending[cap - len(running):]
            if batch:
                for job, handle in zip(batch, submit(executor, batch, local)):
                    running.append((job, handle))
                    plan = "continues (--c)" if fold_state(Path(job.folder)) == "interrupted" else "fresh"
                    where = "" if local else f"Slurm job {handle.job_id}, "
                    progress.line("started" if local else "queued", job, f"{where}{plan}; log {job.log}")
            if queue is not None:
                labels = {handle.job_id: job for job, handle in running}
                for handle, event, nodes in queue.refresh([handle for _, handle in running]):
                    details = f"on {nodes}" if event == "running" else "continues (--c) when it runs again"
                    progress.line(event, labels[handle.job_id], f"Slurm job {handle.job_id} {details}")
            for entry in [entry for entry in running if ended(entry[1])]:
                running.remove(entry)
                results.append((entry[0], finish(*entry, env, progress, queue)))
            time.sleep(POLL_SECONDS)
    except KeyboardInterrupt:
        cancel(running, local, progress)
        raise
    return results



def longest(results: list[tuple[FoldJob, JobResult]]) -> float:
    """Seconds of the longest job that trained a fold to its end (0 before one has)."""
    return max((r.seconds for _, r in results if r.status in ("trained", "resumed")), default=0.0)
