"""`nnunet-segmamba benchmark`: cost of trainers' networks at a plans configuration, side by side.

For each trainer, its network (built by the trainer's own `build_network_architecture`) at the
configuration's patch and batch size: parameters, forward GFLOPs (convolutions and matrix products, as
torch's FlopCounterMode counts them; the scan's elementwise work is not included), training-step time
(forward, deep-supervised cross-entropy, backward, SGD step, under autocast), peak memory of that step,
and inference time of one patch. Median over repeats after warm-up; GPU times with CUDA events.

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
from pathlib import Path

from nnunet_segmamba.tools.benchmark.configurations import (PRESETS, RESENC_ROW, BenchmarkError, load_configuration,
                                                            resenc_configuration)
from nnunet_segmamba.tools.benchmark.network import AMP, benchmark_network
from nnunet_segmamba.tools.benchmark.profiling import PROFILE_STEPS, TOP_KERNELS
from nnunet_segmamba.tools.benchmark.report import print_tables, results_json
from nnunet_segmamba.tools.benchmark.timing import predict_volume_seconds


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


def main(args: argparse.Namespace) -> int:
    """Benchmarks each trainer's network (and the ResEnc row) and prints the tables; 0, or 2 after a one-line
    error."""
    import torch
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunet_segmamba.mamba import Mamba, backend_for_compile, describe_backend, use_backend
    from nnunet_segmamba.tools.environment import find_trainer

    try:
        folder = Path(args.output).resolve().parent if args.output else None
        if folder is not None and not (folder.is_dir() and os.access(folder, os.W_OK)):
            raise BenchmarkError(f"cannot write {args.output}: its folder is missing or not writable")
        plans, configuration_name, in_channels, num_classes = load_configuration(args)
    except BenchmarkError as error:
        print(f"error: {error}")
        return 2
    manager = PlansManager(plans)
    configuration = manager.get_configuration(configuration_name)
    volume = args.predict_volume
    if volume and (len(volume) != 1 + len(configuration.patch_size) or volume[0] != in_channels):
        print(f"error: --predict-volume needs {in_channels} (the input channels) followed by "
              f"{len(configuration.patch_size)} spatial sizes, not {' '.join(map(str, volume))}")
        return 2
    batch_size = args.batch_size or configuration.batch_size
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    print(f"{configuration_name}: patch {configuration.patch_size}, batch {batch_size}, {in_channels} -> "
          f"{num_classes} channels, autocast {args.amp}, {device}"
          f"{' (' + torch.cuda.get_device_name(device) + ')' if device.type == 'cuda' else ''}")
    try:  # all lookups before the Mamba kernels load (see find_trainer)
        rows = [(name, find_trainer(name), configuration) for name in args.trainers]
        if args.resenc:
            rows.insert(1, (RESENC_ROW, find_trainer("nnUNetTrainer"), resenc_configuration(configuration)))
    except RuntimeError as error:
        print(f"error: {error}")
        return 2
    print(describe_backend(device))
    compiled_backend = backend_for_compile(device) if args.compile else None
    if compiled_backend is not None:  # as our trainers do when they compile
        print(f"torch.compile: {describe_backend(device, compiled_backend)}")
    results = []
    for name, trainer, row_configuration in rows:
        network = trainer.build_network_architecture(manager, row_configuration, in_channels, num_classes, True)
        has_mamba = any(isinstance(module, Mamba) for module in network.modules())
        for index, backend in enumerate(args.backends if args.backends and has_mamba else [None]):
            use_backend(network, backend)  # None: the environment's scan (under nnUNet_compile the build sets another)
            label = name if backend is None else f"{name} [{backend}]"
            print(f"  {label} ...", flush=True)
            results.append(benchmark_network(label, network, configuration.patch_size, batch_size, in_channels,
                                             num_classes, device, args.amp, args.warmup, args.repeats,
                                             profile=args.profile, compiled=args.compile and index == 0,
                                             compiled_backend=compiled_backend))
            if args.predict_volume:
                network.decoder.deep_supervision = False
                results[-1].volume_s = predict_volume_seconds(network, manager, row_configuration, num_classes,
                                                              args.predict_volume, device)
                network.decoder.deep_supervision = True
        del network
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print_tables(results, args.warmup, args.repeats, args.profile, args.compile)
    if args.output:
        payload = results_json(configuration_name, configuration, batch_size, in_channels, num_classes, args.amp,
                               device, results)
        try:
            Path(args.output).write_text(json.dumps(payload, indent=2))
        except OSError as error:
            print(f"error: cannot write {args.output}: {error}")
            return 2
    return 0
