"""`nnunet-segmamba benchmark`: cost of trainers' networks at a plans configuration, side by side.

For each trainer, its network (built by the trainer's own `build_network_architecture`) at the
configuration's patch and batch size: parameters, forward GFLOPs (convolutions and matrix products, as
torch's FlopCounterMode counts them; the scan's elementwise work is not included), training-step time
(forward, deep-supervised cross-entropy, backward, SGD step, under autocast), peak memory of that step,
and inference time of one patch. Median over repeats after warm-up; GPU times with CUDA events.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

PRESETS = {
    "3d_128": {"patch_size": [128, 128, 128], "batch_size": 2, "features": [32, 64, 128, 256, 320, 320],
               "strides": [[1, 1, 1]] + [[2, 2, 2]] * 5, "kernels": [[3, 3, 3]] * 6},
    "3d_64": {"patch_size": [64, 64, 64], "batch_size": 2, "features": [32, 64, 128, 256, 320],
              "strides": [[1, 1, 1]] + [[2, 2, 2]] * 4, "kernels": [[3, 3, 3]] * 5},
    "2d_512": {"patch_size": [512, 512], "batch_size": 12, "features": [32, 64, 128, 256, 512, 512, 512, 512],
               "strides": [[1, 1]] + [[2, 2]] * 7, "kernels": [[3, 3]] * 8},
}
"""nnU-Net's default plans for isotropic data at these patch sizes (what nnUNetv2_plan_experiment emits)."""

AMP = {"fp16": "float16", "bf16": "bfloat16", "fp32": None}

RESENC_BLOCKS = (1, 3, 4, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6)
"""Encoder blocks per stage of nnU-Net's ResEnc presets (M, L and XL differ only in their memory target,
hence patch and batch); one conv per decoder stage."""
RESENC_ROW = "nnUNetTrainer (ResEnc)"


def resenc_configuration(configuration):
    """`configuration`'s geometry (patch, strides, kernels, features) with nnU-Net's ResEnc UNet, as its ResEnc
    planners write it: the ResEnc-L network at this patch."""
    from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager

    architecture = configuration.configuration["architecture"]
    kwargs = {k: v for k, v in architecture["arch_kwargs"].items() if k != "n_conv_per_stage"}
    n_stages = kwargs["n_stages"]
    kwargs.update(n_blocks_per_stage=list(RESENC_BLOCKS[:n_stages]), n_conv_per_stage_decoder=[1] * (n_stages - 1))
    return ConfigurationManager({**configuration.configuration, "architecture": {
        **architecture, "network_class_name": "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet",
        "arch_kwargs": kwargs}})


class BenchmarkError(Exception):
    """A bad argument or missing input: printed as one line, exit code 2."""


@dataclass
class Result:
    trainer: str
    params_m: float
    gflops_forward: float
    train_step_ms: float
    train_peak_gib: float | None
    inference_ms: float
    inference_peak_gib: float | None
    network: str  # dotted class name
    volume_s: float | None = None  # nnU-Net's sliding-window prediction of --predict-volume


def preset_plans(name: str, in_channels: int) -> dict:
    """A plans dict (nnU-Net's format) holding one configuration, `name`."""
    preset = PRESETS[name]
    dim = len(preset["patch_size"])
    n_stages = len(preset["features"])
    arch_kwargs = {
        "n_stages": n_stages, "features_per_stage": preset["features"], "conv_op": f"torch.nn.modules.conv.Conv{dim}d",
        "kernel_sizes": preset["kernels"], "strides": preset["strides"], "n_conv_per_stage": [2] * n_stages,
        "n_conv_per_stage_decoder": [2] * (n_stages - 1), "conv_bias": True,
        "norm_op": f"torch.nn.modules.instancenorm.InstanceNorm{dim}d", "norm_op_kwargs": {"eps": 1e-5, "affine": True},
        "dropout_op": None, "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True},
    }
    configuration = {
        "data_identifier": name, "preprocessor_name": "DefaultPreprocessor", "batch_size": preset["batch_size"],
        "patch_size": preset["patch_size"], "spacing": [1.0] * dim, "normalization_schemes": ["ZScoreNormalization"] * in_channels,
        "use_mask_for_norm": [False] * in_channels, "batch_dice": False,
        "architecture": {"network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
                         "arch_kwargs": arch_kwargs, "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]},
    }
    return {"dataset_name": f"Preset_{name}", "plans_name": "nnUNetPlans", "configurations": {name: configuration},
            "original_median_spacing_after_transp": [1.0] * dim, "image_reader_writer": "NibabelIO",
            "transpose_forward": list(range(dim)), "transpose_backward": list(range(dim)),
            "label_manager": "LabelManager", "foreground_intensity_properties_per_channel": {}}


def _timer(device):
    """A function running `fn` `repeats` times and returning the median milliseconds."""
    import torch

    def median_ms(fn, warmup: int, repeats: int) -> float:
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeats):
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize(device)
                times.append(start.elapsed_time(end))
            else:
                begin = time.perf_counter()
                fn()
                times.append(1000 * (time.perf_counter() - begin))
        return statistics.median(times)

    return median_ms


def _peak(device, fn) -> float | None:
    import torch

    if device.type != "cuda":
        fn()
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) / 2**30


def benchmark_network(trainer_name: str, network, patch_size, batch_size: int, in_channels: int, num_classes: int,
                      device, amp: str, warmup: int, repeats: int) -> Result:
    """Times one network; `network` has deep supervision on."""
    import torch
    import torch.nn.functional as F
    from torch.utils.flop_counter import FlopCounterMode

    network = network.to(device)
    dtype = getattr(torch, AMP[amp]) if AMP[amp] else None

    def autocast():
        return torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()

    generator = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(batch_size, in_channels, *patch_size, device=device, generator=generator)
    with torch.no_grad():
        shapes = [o.shape for o in network(x[:1])]
    targets = [torch.randint(0, num_classes, (batch_size, *s[2:]), device=device, generator=generator) for s in shapes]
    weights = [1 / 2**i for i in range(len(targets))]
    optimizer = torch.optim.SGD(network.parameters(), lr=1e-3, momentum=0.99, nesterov=True)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)

    def train_step():
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            outputs = network(x)
            loss = sum(w * F.cross_entropy(o.float(), t) for w, o, t in zip(weights, outputs, targets)) / sum(weights)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    median_ms = _timer(device)
    network.train()
    train_peak = _peak(device, train_step)
    train_ms = median_ms(train_step, warmup, repeats)

    network.eval()
    network.decoder.deep_supervision = False
    single = x[:1]

    def infer():
        with torch.no_grad(), autocast():
            network(single)

    inference_peak = _peak(device, infer)
    inference_ms = median_ms(infer, warmup, repeats)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        network(single.float())
    network.decoder.deep_supervision = True
    params = sum(p.numel() for p in network.parameters())
    return Result(trainer_name, params / 1e6, counter.get_total_flops() / 1e9, train_ms, train_peak, inference_ms,
                  inference_peak, f"{type(network).__module__}.{type(network).__qualname__}")


def predict_volume_seconds(network, plans_manager, configuration, num_classes: int, shape: list[int],
                           device) -> float:
    """Seconds of nnU-Net's sliding-window prediction (tile step 0.5, Gaussian weighting, mirroring on all
    axes, as nnUNetv2_predict) of a random (C, *spatial) volume; `network` without deep supervision."""
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    predictor = nnUNetPredictor(device=device, perform_everything_on_device=device.type == "cuda", allow_tqdm=False)
    labels = {"background": 0, **{f"class{i}": i for i in range(1, num_classes)}}
    predictor.manual_initialization(network, plans_manager, configuration, None, {"labels": labels}, "benchmark",
                                    tuple(range(len(configuration.patch_size))))
    volume = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        predictor.predict_sliding_window_return_logits(volume[(slice(None), *(slice(0, 1),) * (len(shape) - 1))])
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        begin = time.perf_counter()
        predictor.predict_sliding_window_return_logits(volume)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return time.perf_counter() - begin


def load_configuration(args) -> tuple[dict, str, int, int]:
    """(plans dict, configuration name, input channels, output channels) from the arguments."""
    from batchgenerators.utilities.file_and_folder_operations import load_json

    if args.preset:
        return preset_plans(args.preset, args.in_channels), args.preset, args.in_channels, args.num_classes
    if args.plans_file:
        plans_file = Path(args.plans_file)
        if not plans_file.is_file():
            raise BenchmarkError(f"no plans file {plans_file}")
        plans, dataset_json = load_json(str(plans_file)), None
    else:
        from nnunetv2.paths import nnUNet_preprocessed
        from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

        if not nnUNet_preprocessed.is_set():
            raise BenchmarkError("nnUNet_preprocessed is not set; export it, or use --preset / --plans-file")
        try:
            folder = Path(nnUNet_preprocessed.get()) / maybe_convert_to_dataset_name(args.dataset)
        except RuntimeError as error:
            raise BenchmarkError(str(error).split(". ")[0]) from None
        plans_file = folder / f"{args.plans}.json"
        if not plans_file.is_file():
            raise BenchmarkError(f"no plans file {plans_file}; run nnUNetv2_plan_and_preprocess -d {args.dataset}")
        plans, dataset_json = load_json(str(plans_file)), load_json(str(folder / "dataset.json"))
    if args.configuration not in plans["configurations"]:
        raise BenchmarkError(f"{plans_file} has no configuration {args.configuration!r}; it has "
                             f"{', '.join(plans['configurations'])}")
    if dataset_json is None:
        return plans, args.configuration, args.in_channels, args.num_classes
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    manager = PlansManager(plans)
    in_channels = determine_num_input_channels(manager, manager.get_configuration(args.configuration), dataset_json)
    return plans, args.configuration, in_channels, manager.get_label_manager(dataset_json).num_segmentation_heads


def add_arguments(parser: argparse.ArgumentParser) -> None:
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
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("-o", "--output", help="write the results as JSON here")


def format_table(results: list[Result], reference: Result) -> str:
    volumes = any(r.volume_s is not None for r in results)
    header = (f"{'trainer':<34} {'params M':>9} {'GFLOP':>8} {'step ms':>9} {'x ref':>6} {'peak GiB':>9} {'x ref':>6} "
              f"{'infer ms':>9} {'x ref':>6}" + (f" {'volume s':>9} {'x ref':>6}" if volumes else ""))
    lines = [header, "-" * len(header)]
    for r in results:
        def ratio(value, base):
            return f"{value / base:6.2f}" if value is not None and base else f"{'-':>6}"
        peak = f"{r.train_peak_gib:9.2f}" if r.train_peak_gib is not None else f"{'-':>9}"
        lines.append(f"{r.trainer:<34} {r.params_m:9.1f} {r.gflops_forward:8.0f} {r.train_step_ms:9.1f} "
                     f"{ratio(r.train_step_ms, reference.train_step_ms)} {peak} "
                     f"{ratio(r.train_peak_gib, reference.train_peak_gib)} {r.inference_ms:9.1f} "
                     f"{ratio(r.inference_ms, reference.inference_ms)}"
                     + (f" {r.volume_s:9.2f} {ratio(r.volume_s, reference.volume_s)}" if volumes else ""))
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    import torch
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunet_segmamba.mamba import describe_backend
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
    results = []
    for name, trainer, row_configuration in rows:
        network = trainer.build_network_architecture(manager, row_configuration, in_channels, num_classes, True)
        print(f"  {name} ...", flush=True)
        results.append(benchmark_network(name, network, configuration.patch_size, batch_size, in_channels,
                                         num_classes, device, args.amp, args.warmup, args.repeats))
        if args.predict_volume:
            network.decoder.deep_supervision = False
            results[-1].volume_s = predict_volume_seconds(network, manager, row_configuration, num_classes,
                                                          args.predict_volume, device)
        del network
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print()
    print(format_table(results, results[0]))
    print(f"(ratios relative to {results[0].trainer}; GFLOP: convolutions and matrix products of one forward, "
          f"batch 1; medians of {args.repeats} after {args.warmup} warm-up)")
    if args.output:
        payload = {"configuration": configuration_name, "patch_size": configuration.patch_size,
                   "batch_size": batch_size, "in_channels": in_channels, "num_classes": num_classes,
                   "architecture": {"arch_kwargs": configuration.network_arch_init_kwargs,
                                    "_kw_requires_import": configuration.network_arch_init_kwargs_req_import},
                   "amp": args.amp, "device": str(device),
                   "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                   "results": [{k: (None if isinstance(v, float) and math.isnan(v) else v)
                                for k, v in asdict(r).items()} for r in results]}
        try:
            Path(args.output).write_text(json.dumps(payload, indent=2))
        except OSError as error:
            print(f"error: cannot write {args.output}: {error}")
            return 2
    return 0
