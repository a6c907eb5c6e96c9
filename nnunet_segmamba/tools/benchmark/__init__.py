"""`nnunet-segmamba benchmark`: cost of trainers' networks at a plans configuration, side by side.

For each trainer, its network (built by the trainer's own `build_network_architecture`) at the
configuration's patch and batch size: parameters, forward GFLOPs (convolutions and matrix products, as
torch's FlopCounterMode counts them; the scan's elementwise work is not included), training-step time
(forward, deep-supervised cross-entropy, backward, SGD step, under autocast), peak memory of that step,
and inference time of one patch. Median over repeats after warm-up; GPU times with CUDA events; cuDNN autotuned,
as `nnUNetv2_train` and `nnUNetv2_predict` run it.

`--profile` adds, per network, where a training step's time goes: torch.profiler over a few steps after the
timed ones, device time of the CUDA kernels (self CPU time of the ops on the CPU) per category (scan,
convolution, matmul, normalization, copy/layout, elementwise, reduction, optimizer, other; `kernel_category`)
and the top kernels, in ms per step. `--compile` adds the same training step with `torch.compile(network)`
(default mode): compile time (the first step's wall time), step time after warm-up, peak memory and graph
breaks; on a GPU its Mamba layers use the scan our trainers compile with (`backend_for_compile`: Triton, which
compiles into the graph); a network that fails to compile gets the error in its row.

Here the command's arguments and run; `configurations` (presets, plans files, the ResEnc row), `timing` (median
times, peaks, the training step), `network` (one network's `Result`), `profiling` (--profile), `compiled`
(--compile) and `report` (tables, JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from nnunet_segmamba.tools.benchmark.configurations import (PRESETS, RESENC_ROW, BenchmarkError, load_configuration,
                                                            resenc_configuration)
from nnunet_segmamba.tools.benchmark.network import AMP, Result, benchmark_network
from nnunet_segmamba.tools.benchmark.profiling import PROFILE_STEPS, TOP_KERNELS
from nnunet_segmamba.tools.benchmark.report import print_tables, results_json, table_header, table_row
from nnunet_segmamba.tools.benchmark.timing import cudnn_as_nnunet, predict_volume_seconds
from nnunet_segmamba.tools.errors import FAILURE, INTERRUPTED, report

if TYPE_CHECKING:
    import torch
    from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `benchmark` subcommand's arguments."""
    parser.description = __doc__.splitlines()[0].split(": ", 1)[1]
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("-d", "--dataset", help="dataset id or name (plans from nnUNet_preprocessed)")
    source.add_argument("--preset", choices=sorted(PRESETS), help="a built-in nnU-Net configuration (no dataset)")
    source.add_argument("--plans-file", help="a plans JSON file (channels from --in-channels / --num-classes)")
    parser.add_argument("-c", "--configuration", default="3d_fullres")
    parser.add_argument("-p", "--plans", default="nnUNetPlans", help="plans identifier (with -d)")
    parser.add_argument("-tr", "--trainers", nargs="+", required=True, help="trainer class names (any nnU-Net trainer)")
    parser.add_argument("--in-channels", type=int, default=4, help="input channels without -d (default 4)")
    parser.add_argument("--num-classes", type=int, default=4, help="output channels without -d (default 4)")
    parser.add_argument("--batch-size", type=int, help="override the configuration's batch size")
    parser.add_argument("--resenc", action="store_true", help="add nnU-Net's ResEnc UNet at the same geometry "
                        "(ResEnc-L's network) as a row after the first trainer")
    parser.add_argument("--predict-volume", type=int, nargs="+", metavar="C D H W",
                        help="also time nnU-Net's sliding-window prediction (with mirroring) of a volume this shape, "
                        "e.g. 4 155 240 240")
    parser.add_argument("--amp", choices=sorted(AMP), default="fp16", help="autocast dtype for all (default fp16)")
    parser.add_argument("--backends", nargs="+", choices=("cuda", "triton", "torch"), metavar="BACKEND",
                        help="eager rows of each network with Mamba layers on each of these scan backends, side by "
                        "side (cuda, triton, torch; --compile compiles once, on the scan our trainers compile "
                        "with); default: the environment's choice (NNUNET_SEGMAMBA_SCAN)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--profile", action="store_true", help=f"also profile {PROFILE_STEPS} training steps of each "
                        "network with torch.profiler: time per kernel category (scan, convolution, matmul, ...) and "
                        f"the top {TOP_KERNELS} kernels, in ms per step (CUDA kernels' device time; on the CPU the "
                        "ops' self CPU time); with --compile the compiled step's too")
    parser.add_argument("--compile", action="store_true", help="also time the training step with "
                        "torch.compile(network) (default mode), as nnUNetv2_train runs it on CUDA: step time and "
                        "speed-up over eager, compile time (the first step), peak memory, graph breaks; a network "
                        "that fails to compile shows the error")
    parser.add_argument("-o", "--output", help="write the results as JSON here")


@dataclass(frozen=True)
class Setup:
    """What a run measures, its arguments checked: the networks (name, trainer class, configuration to build) at
    `configuration`'s patch and `batch_size` on `device`."""

    manager: PlansManager
    configuration_name: str
    configuration: ConfigurationManager
    networks: list[tuple[str, type, ConfigurationManager]]
    batch_size: int
    in_channels: int
    num_classes: int
    device: torch.device
    output: Path | None

    def json(self, args: argparse.Namespace, results: list[Result]) -> dict:
        return results_json(self.configuration_name, self.configuration, self.batch_size, self.in_channels,
                            self.num_classes, args.amp, self.device, results)


def checked_setup(args: argparse.Namespace) -> Setup:
    """The run the arguments ask for; a BenchmarkError (one line) for anything wrong with them."""
    import torch
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunet_segmamba.mamba.backends import scan_ops
    from nnunet_segmamba.tools.environment import find_trainer

    output = Path(args.output).resolve() if args.output else None
    if output is not None and not (output.parent.is_dir() and os.access(output.parent, os.W_OK)):
        raise BenchmarkError(f"cannot write {args.output}: its folder is missing or not writable")
    plans, configuration_name, in_channels, num_classes = load_configuration(args)
    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as error:  # "Expected one of cpu, cuda, ... device type"
        raise BenchmarkError(f"--device {args.device}: {error}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BenchmarkError("--device cuda: no CUDA GPU here; use --device cpu")
    manager = PlansManager(plans)
    configuration = manager.get_configuration(configuration_name)
    volume = args.predict_volume
    if volume and (len(volume) != 1 + len(configuration.patch_size) or volume[0] != in_channels):
        raise BenchmarkError(f"--predict-volume needs {in_channels} (the input channels) followed by "
                             f"{len(configuration.patch_size)} spatial sizes, not {' '.join(map(str, volume))}")
    try:  # all lookups before the Mamba kernels load (see find_trainer)
        networks = [(name, find_trainer(name), configuration) for name in args.trainers]
        if args.resenc:
            networks.insert(1, (RESENC_ROW, find_trainer("nnUNetTrainer"), resenc_configuration(configuration)))
    except RuntimeError as error:
        raise BenchmarkError(str(error)) from None
    for backend in args.backends or ():  # each scan asked for runs here, before any network is measured
        try:
            scan_ops(device, backend)
        except RuntimeError as error:
            raise BenchmarkError(f"--backends {backend}: {error}") from None
    return Setup(manager, configuration_name, configuration, networks, args.batch_size or configuration.batch_size,
                 in_channels, num_classes, device, output)


def measure(setup: Setup, name: str, trainer: type, configuration: ConfigurationManager,
            args: argparse.Namespace, compiled_backend: str | None) -> Iterator[Result]:
    """One network's `Result`s, each as soon as it is measured: a row per scan backend of --backends (compiled with
    the first) if it has Mamba layers, else one; with --predict-volume each with its sliding-window time."""
    import torch

    from nnunet_segmamba.mamba import Mamba, use_backend

    network = trainer.build_network_architecture(setup.manager, configuration, setup.in_channels, setup.num_classes,
                                                 True)
    has_mamba = any(isinstance(module, Mamba) for module in network.modules())
    for index, backend in enumerate(args.backends if args.backends and has_mamba else [None]):
        use_backend(network, backend)  # None: the environment's scan (under nnUNet_compile the build sets another)
        label = name if backend is None else f"{name} [{backend}]"
        print(f"measuring {label} ...", file=sys.stderr, flush=True)  # progress, apart from the table
        result = benchmark_network(label, network, setup.configuration.patch_size, setup.batch_size,
                                   setup.in_channels, setup.num_classes, setup.device, args.amp, args.warmup,
                                   args.repeats, profile=args.profile, compiled=args.compile and index == 0,
                                   compiled_backend=compiled_backend)
        if args.predict_volume:
            network.decoder.deep_supervision = False
            result.volume_s = predict_volume_seconds(network, setup.manager, configuration, setup.num_classes,
                                                     args.predict_volume, setup.device)
            network.decoder.deep_supervision = True
        yield result
    del network
    if setup.device.type == "cuda":
        torch.cuda.empty_cache()


def write_json(path: Path, payload: dict) -> None:
    """`payload` into `path`, through a temporary file beside it: a reader never sees half a file."""
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(json.dumps(payload, indent=2))
    partial.replace(path)


def main(args: argparse.Namespace) -> int:
    """Benchmarks each trainer's network (and the ResEnc row), printing its row of the table as soon as it is
    measured (with -o rewriting the JSON), then the footnote and the --profile / --compile tables. Exit code 0; 2
    after a one-line error on the arguments; 1 if the JSON cannot be written; 130 when interrupted, after the
    tables of what was measured."""
    import torch

    from nnunet_segmamba.mamba import backend_for_compile, describe_backend

    try:
        setup = checked_setup(args)
    except BenchmarkError as error:
        return report("benchmark", str(error))
    device, volume = setup.device, bool(args.predict_volume)
    cudnn_as_nnunet()
    print(f"{setup.configuration_name}: patch {setup.configuration.patch_size}, batch {setup.batch_size}, "
          f"{setup.in_channels} -> {setup.num_classes} channels, autocast {args.amp}, {device}"
          f"{' (' + torch.cuda.get_device_name(device) + ')' if device.type == 'cuda' else ''}")
    print(describe_backend(device))
    compiled_backend = backend_for_compile(device) if args.compile else None
    if compiled_backend is not None:  # as our trainers do when they compile
        print(f"torch.compile: {describe_backend(device, compiled_backend)}")
    print(f"\n{table_header(volume)}", flush=True)
    results = []
    networks_done = 0
    try:
        for name, trainer, configuration in setup.networks:
            for result in measure(setup, name, trainer, configuration, args, compiled_backend):
                results.append(result)
                print(table_row(result, results[0], volume), flush=True)
                if setup.output is not None:
                    try:
                        write_json(setup.output, setup.json(args, results))
                    except OSError as error:
                        return report("benchmark", f"cannot write {setup.output}: {error}", FAILURE)
            networks_done += 1
    except KeyboardInterrupt:
        if results:
            print_tables(results, args.warmup, args.repeats, args.profile, args.compile)
        kept = f"; {setup.output} holds them" if setup.output is not None and results else ""
        return report("benchmark", f"interrupted after {networks_done} of {len(setup.networks)} networks{kept}",
                      INTERRUPTED)
    print_tables(results, args.warmup, args.repeats, args.profile, args.compile)
    return 0
