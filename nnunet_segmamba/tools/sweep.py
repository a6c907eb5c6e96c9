"""`nnunet-segmamba sweep`: train trainers x datasets x folds with nnU-Net's stock command, then compare them.

Each fold is one `nnUNetv2_train DATASET CONFIGURATION FOLD -tr TRAINER -p PLANS` job run by submitit, on this
machine (at most --jobs at once, sharing the CPUs for data augmentation) or on Slurm, folds outermost.
--epochs/--iterations train fixed-budget variants `<trainer>_e{E}i{I}`; --keep results deletes each fold's
checkpoints once it is validated; --time-limit stops starting folds that would not finish in time. A re-run skips
finished folds (validated, kept whole or as results) and continues interrupted ones (--c); at the end
`nnunet-segmamba compare` gives paired statistics across the folds.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from nnunet_segmamba.tools import sweep_slurm
from nnunet_segmamba.tools.environment import ext_trainer_folders
from nnunet_segmamba.tools.errors import FAILURE, USAGE, report
from nnunet_segmamba.tools.sweep_jobs import FoldJob, JobResult, fold_state
from nnunet_segmamba.tools.sweep_runner import Progress, SubmissionFailed, run_jobs

if TYPE_CHECKING:
    import submitit

MARKER = ".nnunet_segmamba_sweep"
NNUNET_FOLDS = 5  # nnU-Net's split when the dataset has no splits_final.json
LOCAL_TIMEOUT_MIN = 60 * 24 * 365  # submitit's local executor stops a job after timeout_min (default: 2 minutes)


class SweepError(Exception):
    """A bad argument: printed as one line, exit code 2, nothing written."""


@dataclass(frozen=True)
class Grid:
    """The sweep, its arguments checked."""

    datasets: list[str]
    trainers: dict[str, type]
    """The trainer classes given, by the name trained (the budget variant's name with a budget)."""
    plans: list[str]
    configurations: list[str]
    folds: list[str]
    baseline: str
    budget: dict[str, int]
    device: str
    output: Path
    slurm: sweep_slurm.SlurmRequest | None
    """What each job asks Slurm for (None: the jobs run on this machine)."""


def budget_of(args: argparse.Namespace) -> tuple[str, dict[str, int]]:
    """The variant name suffix and trainer attributes of --epochs/--iterations (empty without them)."""
    suffix, attributes = "", {}
    if args.epochs:
        suffix, attributes["num_epochs"] = f"e{args.epochs}", args.epochs
    if args.iterations:
        suffix += f"i{args.iterations}"
        attributes.update(num_iterations_per_epoch=args.iterations,
                          num_val_iterations_per_epoch=max(1, args.iterations // 5))
    return (f"_{suffix}" if suffix else ""), attributes


def check_folders() -> None:
    """nnUNet_preprocessed is a folder; nnUNet_results is set (nnUNetv2_train creates it)."""
    for name in ("nnUNet_preprocessed", "nnUNet_results"):
        value = os.environ.get(name)
        if not value:
            raise SweepError(f"{name} is not set: export {name}=/path/to/{name} (README, Set-up)")
        if not os.path.isdir(value) and (name == "nnUNet_preprocessed" or os.path.exists(value)):
            raise SweepError(f"{name}={value} is not a folder")


def check_dataset(dataset: str, plans: list[str], configurations: list[str], folds: list[str]) -> None:
    """The dataset is preprocessed for every plans and configuration, and has the folds."""
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    base = Path(os.environ["nnUNet_preprocessed"]) / dataset
    todo = f"run nnUNetv2_plan_and_preprocess -d {dataset} -c {' '.join(configurations)} (or check -p/-c)"
    for identifier in plans:
        if not (base / f"{identifier}.json").is_file():
            raise SweepError(f"{dataset} has no {base / identifier}.json: {todo}")
        manager = PlansManager(str(base / f"{identifier}.json"))
        for configuration in configurations:
            if configuration not in manager.available_configurations:
                raise SweepError(f"{identifier} of {dataset} has no configuration {configuration!r} (it has "
                                 f"{', '.join(manager.available_configurations)})")
            if not (base / manager.get_configuration(configuration).data_identifier).is_dir():
                raise SweepError(f"{dataset} is not preprocessed for {identifier} {configuration}: {todo}")
    splits = base / "splits_final.json"
    if not splits.is_file() and len(case_identifiers(base, plans[0], configurations[0])) < NNUNET_FOLDS:
        raise SweepError(f"{dataset} has fewer than {NNUNET_FOLDS} training cases, too few for nnU-Net's 5-fold split")
    count = len(load_json(str(splits))) if splits.is_file() else NNUNET_FOLDS
    where = "in its splits_final.json" if splits.is_file() else "in nnU-Net's default split"
    for fold in folds:
        if not fold.isdigit() or int(fold) >= count:
            raise SweepError(f"fold {fold!r} does not exist: {dataset} has folds 0-{count - 1} {where}")


def find_trainers(names: list[str]) -> dict[str, type]:
    """The trainer classes, looked up as nnUNetv2_train does (nnunetv2, our folder, the user's folders)."""
    from nnunet_segmamba.tools.environment import find_trainer

    classes = {}
    for name in names:
        try:
            classes[name] = find_trainer(name)
        except RuntimeError as error:
            raise SweepError(str(error)) from None
    return classes


def check_output(output: Path) -> None:
    if output.exists() and not (output / MARKER).exists() and (not output.is_dir() or any(output.iterdir())):
        raise SweepError(f"{output} exists and is not a sweep's folder: choose another -o")
    existing = next(p for p in (output, *output.parents) if p.exists())
    if not os.access(existing, os.W_OK):
        raise SweepError(f"{output} cannot be written ({existing} is not writable): choose another -o")


def default_device(cluster: str) -> str:
    if cluster == "slurm":
        return "cuda"
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def check_arguments(args: argparse.Namespace) -> Grid:
    """Everything the jobs need, checked before anything is written."""
    from nnunet_segmamba.tools.results import CompareError, dataset_names

    check_folders()
    if args.cluster == "slurm" and not shutil.which("sbatch"):
        raise SweepError("--cluster slurm needs Slurm's sbatch on PATH: run the sweep on a Slurm login node")
    try:
        datasets = dataset_names(args.datasets)
    except CompareError as error:
        raise SweepError(f"{error}; is it in nnUNet_preprocessed ({os.environ['nnUNet_preprocessed']})?") from None
    folds = list(dict.fromkeys(args.folds))
    for dataset in datasets:
        check_dataset(dataset, args.plans, args.configurations, folds)
    baseline = args.baseline or args.trainers[0]
    given = find_trainers(list(dict.fromkeys([*args.trainers, baseline])))
    suffix, budget = budget_of(args)
    output = Path(args.output).resolve()
    check_output(output)
    device = args.device or default_device(args.cluster)
    if device == "cuda" and args.cluster == "local" and default_device("local") != "cuda":
        raise SweepError("-device cuda: no CUDA GPU here; use -device cpu or run on a GPU machine")
    try:
        slurm = sweep_slurm.request(args, device) if args.cluster == "slurm" else None
    except ValueError as error:
        raise SweepError(str(error)) from None
    return Grid(datasets, {f"{name}{suffix}": cls for name, cls in given.items()}, list(dict.fromkeys(args.plans)),
                list(dict.fromkeys(args.configurations)), folds, f"{baseline}{suffix}", budget, device, output, slurm)


def case_identifiers(base: Path, plans: str, configuration: str) -> list[str]:
    """The preprocessed training cases of a dataset folder, sorted, as nnUNetTrainer.do_split lists them."""
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    data = str(base / PlansManager(str(base / f"{plans}.json")).get_configuration(configuration).data_identifier)
    return sorted(infer_dataset_class(data).get_identifiers(data))


def write_missing_splits(datasets: list[str], plans: str, configuration: str) -> None:
    """nnU-Net's default 5-fold split of the preprocessed cases, written atomically where a dataset has no
    splits_final.json: concurrent first trainings of a dataset would each write it while another reads it."""
    from batchgenerators.utilities.file_and_folder_operations import save_json
    from nnunetv2.utilities.crossval_split import generate_crossval_split

    for dataset in datasets:
        base = Path(os.environ["nnUNet_preprocessed"]) / dataset
        if not (base / "splits_final.json").is_file():
            identifiers = case_identifiers(base, plans, configuration)
            partial = base / f".splits_final.json.{os.getpid()}"
            save_json(generate_crossval_split(identifiers, seed=12345, n_splits=NNUNET_FOLDS), str(partial))
            os.replace(partial, base / "splits_final.json")


def prepare(grid: Grid) -> Path | None:
    """The sweep's folder; the budget variants' folder (None without a budget)."""
    from nnunet_segmamba.training.variants import write_variants_module

    grid.output.mkdir(parents=True, exist_ok=True)
    (grid.output / MARKER).write_text("created by nnunet-segmamba sweep; its logs, trainer variants, jobs, "
                                      "comparison\n")
    write_missing_splits(grid.datasets, grid.plans[0], grid.configurations[0])
    if not grid.budget:
        return None
    folder = grid.output / "trainers"
    for name, cls in grid.trainers.items():  # a module per variant: a later sweep never drops an earlier one's
        write_variants_module(folder, f"sweep_{name}", {name: (cls, grid.budget)})
    return folder


def job_environment(args: argparse.Namespace, grid: Grid, variants: Path | None) -> dict[str, str | None]:
    """What the jobs' environment changes: nnU-Net's folders and trainer hook, its augmentation workers and its
    validation's processes (following the CPUs each job has), and (locally) the GPUs submitit's local executor
    hides."""
    from nnunetv2.configuration import default_num_processes

    env = {name: os.path.abspath(os.environ[name]) for name in ("nnUNet_raw", "nnUNet_preprocessed",
                                                                "nnUNet_results") if os.environ.get(name)}
    env.update(nnUNet_extTrainer=ext_trainer_folders(*([str(variants)] if variants else [])), PYTHONUNBUFFERED="1",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    if args.cluster == "local":
        env["CUDA_VISIBLE_DEVICES"] = os.environ.get("CUDA_VISIBLE_DEVICES")
        available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        cpus = workers = max(1, available // args.jobs)
    else:
        cpus, workers = grid.slurm.cpus, grid.slurm.augmentation_workers
    env["nnUNet_n_proc_DA"] = os.environ.get("nnUNet_n_proc_DA", str(workers))
    # each fold's validation spawns this many processes (nnU-Net's default 8) to export and score its cases: 14
    # folds at once on 16 CPUs spent as long validating as training with 8 (H100, 2026-12-07)
    env["nnUNet_def_n_proc"] = os.environ.get("nnUNet_def_n_proc", str(min(default_num_processes, cpus)))
    return env


def fold_jobs(grid: Grid, env: dict[str, str | None], results_only: bool) -> list[FoldJob]:
    """Every fold of the grid, folds outermost: a sweep cut short holds whole folds of every cell first."""
    from nnunetv2.utilities.file_path_utilities import get_output_folder

    jobs = []
    for fold in grid.folds:
        for dataset in grid.datasets:
            for trainer in grid.trainers:
                for plans in grid.plans:
                    for configuration in grid.configurations:
                        model = f"{trainer}__{plans}__{configuration}"
                        command = ["nnUNetv2_train", dataset, configuration, fold, "-tr", trainer, "-p", plans,
                                   "-device", grid.device, *multi_gpu(grid)]
                        jobs.append(FoldJob(f"{dataset} {model} fold {fold}", command,
                                            get_output_folder(dataset, trainer, plans, configuration, int(fold)),
                                            str(grid.output / "logs" / dataset / f"{model}_fold{fold}.log"), env,
                                            results_only))
    return jobs


def multi_gpu(grid: Grid) -> list[str]:
    """nnUNetv2_train's own multi-GPU training (DDP on one node) where each Slurm job has several GPUs."""
    return ["-num_gpus", str(grid.slurm.gpus)] if grid.slurm and grid.slurm.gpus > 1 else []


def make_executor(grid: Grid) -> submitit.AutoExecutor:
    """submitit's executor: local processes, or Slurm jobs (one job array per submission) that are requeued after
    their time limit at most max_requeues times."""
    import submitit

    if grid.slurm is None:
        executor = submitit.AutoExecutor(folder=grid.output / "submitit", cluster="local")
        executor.update_parameters(timeout_min=LOCAL_TIMEOUT_MIN)
    else:
        executor = submitit.AutoExecutor(folder=grid.output / "submitit", cluster="slurm",
                                         slurm_max_num_timeout=grid.slurm.max_requeues)
        executor.update_parameters(**grid.slurm.executor_parameters())
    return executor


def run_compare(grid: Grid) -> int:
    """`nnunet-segmamba compare` on the sweep's results, into its compare/ folder."""
    from nnunet_segmamba.tools import compare

    parser = argparse.ArgumentParser(prog="nnunet-segmamba compare")
    compare.add_arguments(parser)
    print(f"\n>> nnunet-segmamba compare, baseline {grid.baseline}", flush=True)
    return compare.main(parser.parse_args(["-d", *grid.datasets, "-tr", *grid.trainers, "-p", *grid.plans,
                                           "-c", *grid.configurations, "-f", *grid.folds, "--baseline",
                                           grid.baseline, "-o", str(grid.output / "compare")]))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__.split(": ", 1)[1]
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = ("example: nnunet-segmamba sweep -d 501 502 -tr nnUNetTrainer nnUNetTrainerSegMambaV2 --epochs 50 "
                     "--iterations 250 --jobs 2\nCtrl-C or SIGTERM cancels the jobs in flight; run the same command "
                     "again to go on. Logs: <-o>/logs, comparison: <-o>/compare.")
    positive = _positive_int
    parser.add_argument("-d", dest="datasets", nargs="+", required=True, help="dataset ids or names (preprocessed)")
    parser.add_argument("-tr", dest="trainers", nargs="+", required=True, help="trainer class names")
    parser.add_argument("-f", dest="folds", nargs="+", default=["0", "1", "2", "3", "4"],
                        help="cross-validation folds (default: 0 1 2 3 4)")
    parser.add_argument("-p", dest="plans", nargs="+", default=["nnUNetPlans"], help="plans identifiers "
                        "(default: nnUNetPlans)")
    parser.add_argument("-c", dest="configurations", nargs="+", default=["3d_fullres"],
                        help="configurations (default: 3d_fullres)")
    parser.add_argument("--epochs", type=positive, help="fixed budget: epochs (trains <trainer>_e{E}i{I} variants)")
    parser.add_argument("--iterations", type=positive, help="fixed budget: iterations per epoch")
    parser.add_argument("-device", "--device", choices=("cuda", "cpu", "mps"),
                        help="nnUNetv2_train's -device (default: cuda if available; on Slurm cuda)")
    parser.add_argument("--baseline", help="trainer the others are compared with (default: the first -tr)")
    parser.add_argument("-o", dest="output", default="nnunet_segmamba_sweep",
                        help="the sweep's folder: logs, variants, jobs, comparison (default: ./%(default)s)")
    parser.add_argument("--jobs", type=positive, default=1, help="local: trainings at once on this machine, "
                        "nnUNet_n_proc_DA = CPUs // jobs unless set (default: 1)")
    parser.add_argument("--cluster", choices=("local", "slurm"), default="local",
                        help="where submitit runs the jobs (default: local)")
    parser.add_argument("--keep", choices=("all", "results"), default="all",
                        help="what a trained fold keeps: all (nnU-Net's checkpoints and validation predictions "
                        "too) or results (validation summary, logs, progress.png, debug.json; a few hundred kB): "
                        "folds kept as results count as finished and `compare` reads them (default: all)")
    parser.add_argument("--time-limit", type=_positive_minutes, metavar="MINUTES",
                        help="start no fold that would not finish within MINUTES of the sweep's start (judged by "
                        "the longest fold it has finished) and cancel the folds still running then; run the same "
                        "command again to go on")
    slurm = parser.add_argument_group("Slurm (--cluster slurm)")
    slurm.add_argument("--slurm-partition", help="partition (default: the cluster's default partition)")
    slurm.add_argument("--slurm-time-min", type=positive, help="time limit per job in minutes; a job that reaches "
                       "it is requeued and continues from nnU-Net's last checkpoint (--c) (default: 1440, or the "
                       "partition's limit if lower)")
    slurm.add_argument("--slurm-max-requeues", type=_count, default=10, help="times a fold's job is requeued after its "
                       "time limit (default: %(default)s)")
    slurm.add_argument("--slurm-gpus-per-job", type=_count, help="GPUs per fold; more than 1 trains with nnU-Net's "
                       "multi-GPU (nnUNetv2_train -num_gpus) (default: 1 with -device cuda, else 0)")
    slurm.add_argument("--slurm-cpus-per-job", type=positive, help=f"CPUs per fold; nnUNet_n_proc_DA (unless set) "
                       f"= CPUs per GPU - 1 (default: {sweep_slurm.CPUS_PER_GPU} per GPU, "
                       f"{sweep_slurm.CPUS_WITHOUT_GPU} without GPU)")
    slurm.add_argument("--slurm-mem-gb", type=positive, help="memory per fold in GB (default: the partition's)")
    slurm.add_argument("--slurm-array-parallelism", type=positive,
                       help="jobs running at once (default: as many as the queue allows)")


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def _positive_minutes(text: str) -> float:
    try:
        minutes = float(text)
    except ValueError:
        minutes = float("nan")
    if not minutes > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of minutes, got {text!r}")
    return minutes


def _count(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected 0 or a positive integer, got {text!r}")
    return int(text)


def on_slurm(slurm: sweep_slurm.SlurmRequest) -> str:
    gpus = f"{slurm.gpus} GPU{'s' * (slurm.gpus > 1)}, " if slurm.gpus else ""
    return (f"on Slurm, partition {slurm.partition} ({gpus}{slurm.cpus} CPU{'s' * (slurm.cpus > 1)}, "
            f"{slurm.time_min} min per job)")


def summary(results: list[tuple[FoldJob, JobResult]], skipped: int, seconds: float) -> str:
    """Counts by outcome, and the failed folds with their logs."""
    counts = {status: sum(r.status == status for _, r in results) for status in ("trained", "resumed", "skipped",
                                                                                 "failed", "stopped", "not run")}
    counts["skipped"] += skipped
    left = counts.pop("stopped") + counts.pop("not run")
    failed = "".join(f"\n  failed: {job.label}; log {job.log}" for job, r in results if r.status == "failed")
    later = f"; {left} left by the time limit: run the same command again to go on" if left else ""
    return f"Summary: {', '.join(f'{n} {status}' for status, n in counts.items())} in {seconds:.0f} s{later}{failed}"


def main(args: argparse.Namespace) -> int:
    try:
        grid = check_arguments(args)
    except SweepError as error:
        return report("sweep", str(error), USAGE)
    try:
        variants = prepare(grid)
    except OSError as error:  # the folder cannot be written after all (disk full, read-only)
        return report("sweep", str(error), FAILURE)
    env, local = job_environment(args, grid, variants), grid.slurm is None
    os.environ["nnUNet_extTrainer"] = env["nnUNet_extTrainer"]  # compare's trainer lookups find the variants too
    jobs = fold_jobs(grid, env, args.keep == "results")
    progress = Progress()
    print(f"nnunet-segmamba sweep: {len(jobs)} folds ({len(grid.datasets)} datasets x {len(grid.trainers)} trainers "
          f"x {len(grid.folds)} folds), device {grid.device}, "
          f"{f'{args.jobs} at once on this machine' if local else on_slurm(grid.slurm)}; folder {grid.output}",
          flush=True)
    todo = []
    for job in jobs:
        if fold_state(Path(job.folder)) == "finished":
            progress.line("skipped", job, "finished earlier (validation/summary.json)")
        else:
            todo.append(job)
    deadline = progress.started + 60 * args.time_limit if args.time_limit else None
    try:
        results = run_jobs(make_executor(grid), todo, args.jobs if local else len(todo), local, env, progress,
                           deadline)
    except KeyboardInterrupt:
        print("\ninterrupted: the jobs in flight were cancelled. Run the same command again to go on (finished "
              "folds are skipped, interrupted ones continued).", file=sys.stderr)
        return 130
    except SubmissionFailed as error:
        return report("sweep", str(error), FAILURE)
    print(summary(results, len(jobs) - len(todo), time.time() - progress.started), flush=True)
    compared = run_compare(grid)
    if variants:
        print(f"\nFor nnUNetv2_predict with the budget variants: export nnUNet_extTrainer="
              f"{shlex.quote(env['nnUNet_extTrainer'])}")
    return 1 if compared or any(r.status == "failed" for _, r in results) else 0
