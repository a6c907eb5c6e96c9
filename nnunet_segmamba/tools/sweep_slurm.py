"""A sweep's Slurm side: what each fold's job asks for, checked against the cluster (sinfo) before anything is
submitted, and the jobs' states as squeue lists them, so that a job ending without a result (cancelled, killed,
its node lost) is noticed within seconds, with or without Slurm's accounting database."""

from __future__ import annotations

import argparse
import subprocess
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import submitit

CPUS_PER_GPU = 12
"""nnU-Net's own figure: 'a system with 4 GPUs and 48 threads can use 12 threads per GPU' (default_n_proc_DA.py)."""
CPUS_WITHOUT_GPU = 2
DEFAULT_TIME_MIN = 24 * 60
SIGNAL_DELAY_S = 90
"""submitit's default: Slurm signals a job this long before its time limit (up to 30 s earlier: its check runs
every 30 s); submitit then requeues it."""
QUEUE_POLL_SECONDS = 5.0
RESULT_GRACE_SECONDS = 15.0
"""How long a job may be gone from the queue before its missing result counts as a failure: a shared
filesystem can show the result file a few seconds after the job wrote it."""
ACTIVE = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD",
          "RESIZING", "SIGNALING", "STAGE_OUT", "STOPPED", "PREEMPTED", "RESV_DEL_HOLD"}
"""Job states in which a job still runs or may run again (squeue's long names); any other state has ended it."""
WAITING = {"PENDING", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD"}


@dataclass(frozen=True)
class SlurmRequest:
    """What each fold's job asks Slurm for."""

    partition: str
    time_min: int
    gpus: int
    cpus: int
    mem_gb: int | None
    array_parallelism: int | None
    max_requeues: int

    @property
    def augmentation_workers(self) -> int:
        """nnUNet_n_proc_DA: nnU-Net starts that many workers per training process (one per GPU), each of which
        needs a CPU besides its own."""
        return max(1, self.cpus // max(1, self.gpus) - 1)

    @property
    def signal_delay_s(self) -> int:
        """How long before the time limit Slurm signals the job (nnU-Net stops, submitit requeues it): a quarter
        of a short limit, so that a job of a few minutes still trains for most of them."""
        return min(SIGNAL_DELAY_S, self.time_min * 60 // 4)

    def executor_parameters(self) -> dict[str, Any]:
        """submitit's parameters: srun gets the CPUs too (from Slurm 22.05 on, srun does not inherit sbatch's)."""
        given = {"gpus_per_node": self.gpus or None, "mem_gb": self.mem_gb,
                 "slurm_array_parallelism": self.array_parallelism}
        return {"name": "nnunet-segmamba-sweep", "timeout_min": self.time_min, "cpus_per_task": self.cpus,
                "slurm_partition": self.partition, "slurm_signal_delay_s": self.signal_delay_s,
                "slurm_srun_args": ["--cpus-per-task", str(self.cpus)],
                **{key: value for key, value in given.items() if value is not None}}


def request(args: argparse.Namespace, device: str) -> SlurmRequest:
    """The jobs' request from the --slurm-* options and their defaults; ValueError says what is wrong."""
    gpus = args.slurm_gpus_per_job if args.slurm_gpus_per_job is not None else int(device == "cuda")
    if device == "cuda" and not gpus:
        raise ValueError("-device cuda needs --slurm-gpus-per-job 1 or more")
    if device != "cuda" and gpus:
        raise ValueError(f"--slurm-gpus-per-job {gpus} needs -device cuda (nnU-Net trains on {device})")
    partition, limit = partition_time_limit(args.slurm_partition)
    time_min = args.slurm_time_min or min(DEFAULT_TIME_MIN, limit or DEFAULT_TIME_MIN)
    if limit is not None and time_min > limit:
        raise ValueError(f"--slurm-time-min {time_min} exceeds partition {partition}'s time limit of {limit} "
                         f"minutes: the jobs would never start; choose at most {limit}")
    return SlurmRequest(partition, time_min, gpus, args.slurm_cpus_per_job or
                        (CPUS_PER_GPU * gpus if gpus else CPUS_WITHOUT_GPU), args.slurm_mem_gb,
                        args.slurm_array_parallelism, args.slurm_max_requeues)


def partition_time_limit(partition: str | None) -> tuple[str, int | None]:
    """The partition (the cluster's default one if None) and its time limit in minutes (None: unlimited)."""
    listed = subprocess.run(["sinfo", "--noheader", "--format=%P|%l"], capture_output=True, text=True)
    if listed.returncode:
        raise ValueError(f"sinfo failed: {listed.stderr.strip() or listed.stdout.strip()}")
    limits, default = {}, None
    for line in listed.stdout.split():
        name, limit = line.split("|")
        if name.endswith("*"):
            name = default = name[:-1]
        limits[name] = minutes(limit)
    chosen = partition or default
    if chosen not in limits:
        choice = f"no partition {partition!r}" if partition else "no default partition"
        raise ValueError(f"{choice} on this cluster: choose --slurm-partition from {', '.join(limits) or 'none'}")
    return chosen, limits[chosen]


def minutes(limit: str) -> int | None:
    """Slurm's time format ('infinite', 'MM', 'MM:SS', 'HH:MM:SS', 'D-HH[:MM[:SS]]') in whole minutes."""
    if limit.lower() in ("infinite", "unlimited", "n/a"):
        return None
    days, _, clock = limit.rpartition("-")
    parts = [int(p) for p in clock.split(":")]
    if days:
        hours, mins = parts[0], (parts[1] if len(parts) > 1 else 0)
    else:
        hours, mins = ([0, *parts] if len(parts) < 3 else parts)[:2]
    return int(days or 0) * 24 * 60 + hours * 60 + mins


def queue_states(job_ids: list[str]) -> dict[str, tuple[str, str]] | None:
    """{job id: (state, nodes)} of the jobs Slurm still lists ('123_4' for an array's task); None if squeue
    cannot tell (the controller is busy or down): then nothing is known to have ended."""
    listed = subprocess.run(["squeue", "--noheader", "--array", "--states=all", "--format=%i|%T|%N",
                             f"--jobs={','.join(job_ids)}"], capture_output=True, text=True)
    if listed.returncode:
        return {} if "Invalid job id" in listed.stderr else None
    return {job: (state, nodes) for job, state, nodes in (line.split("|") for line in listed.stdout.splitlines())}


class SlurmQueue:
    """The sweep's jobs as squeue lists them, refreshed at most every QUEUE_POLL_SECONDS."""

    def __init__(self) -> None:
        self.states: dict[str, tuple[str, str]] = {}
        self.gone_since: dict[str, float] = {}
        self.ran: set[str] = set()
        self.refreshed = 0.0

    def refresh(self, handles: list[submitit.Job]) -> list[tuple[submitit.Job, str, str]]:
        """Changes since the last refresh: (job, 'running' or 'requeued' (waiting to run again), its nodes)."""
        if time.time() - self.refreshed < QUEUE_POLL_SECONDS or not handles:
            return []
        listed = queue_states([handle.job_id for handle in handles])
        self.refreshed = time.time()
        if listed is None:
            return []
        changes = []
        for handle in handles:
            before = self.states.get(handle.job_id, ("", ""))[0]
            state, nodes = listed.get(handle.job_id, ("GONE", ""))
            if state == "RUNNING" and before != "RUNNING":
                changes.append((handle, "running", nodes))
                self.ran.add(handle.job_id)
            elif state in WAITING and before not in WAITING and handle.job_id in self.ran:
                changes.append((handle, "requeued", nodes))
            if state not in ACTIVE:
                self.gone_since.setdefault(handle.job_id, self.refreshed)
            self.states[handle.job_id] = (state, nodes)
        return changes

    def state(self, handle: submitit.Job) -> str:
        return self.states.get(handle.job_id, ("UNKNOWN", ""))[0]

    def done(self, handle: submitit.Job) -> bool:
        """The job wrote its result, or has ended without one for RESULT_GRACE_SECONDS."""
        if handle.paths.result_pickle.exists():
            return True
        return time.time() - self.gone_since.get(handle.job_id, time.time()) >= RESULT_GRACE_SECONDS
