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
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import time
from collections.abc import Callable
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

PROFILE_STEPS = 3
TOP_KERNELS = 8
KERNEL_CATEGORIES = (
    ("optimizer", ("multi_tensor_apply", "foreach", "optimizer.")),
    ("normalization", ("batch_norm", "instance_norm", "layer_norm", "group_norm", "rms_norm", "layernorm", "rmsnorm",
                       "bn_fw", "bn_bw", "welford", "rowwisemoments", "gammabeta")),
    ("scan", ("selective_scan", "selectivescan", "causal_conv1d")),
    ("copy/layout", ("nchwtonhwc", "nhwctonchw")),  # cuDNN's layout conversions
    ("convolution", ("convolution", "convolve", "conv1d", "conv2d", "conv3d", "conv_", "fprop", "dgrad", "wgrad",
                     "implicit_gemm", "cudnn", "im2col", "vol2col", "col2vol")),
    ("matmul", ("gemm", "gemv", "cutlass", "cublas", "matmul", "addmm", "bmm", "::mm", "::linear", "splitkreduce")),
    ("copy/layout", ("copy", "contiguous", "clone", "permute", "transpose", "::cat", "concat", "index", "gather",
                     "scatter", "flip", "memcpy", "memset", "upsample", "view", "as_strided", "reshape", "squeeze",
                     "slice", "narrow", "select", "expand", "repeat")),
    ("elementwise", ("elementwise", "triton_poi", "relu", "silu", "sigmoid", "gelu", "softplus", "tanh", "aten::add",
                     "aten::sub", "aten::mul", "aten::div", "aten::exp", "aten::neg", "aten::fill", "aten::zero")),
    ("reduction", ("reduce", "nll_loss", "softmax", "cross_entropy", "triton_red", "triton_per", "cumsum",
                   "devicescan", "::sum", "::mean", "::amax")),
    # mamba/triton_scan.py's kernels, last: ATen's kernels carry such names too (leaky_relu_backward_kernel)
    ("scan", ("_forward_kernel", "_carry_kernel", "_backward_kernel")),
)
"""(category, lower-case substrings) of CUDA kernel and CPU op names; the first rule with a substring in the name
wins, so the specific come before the generic (a copy done by an elementwise kernel is a copy, cuDNN's GEMMs and
layout conversions are not matrix products, `causal_conv1d` is the scan's)."""
CATEGORIES = ("scan", "convolution", "matmul", "normalization", "copy/layout", "elementwise", "reduction", "optimizer",
              "other")
"""KERNEL_CATEGORIES' categories and "other", in the order of the --profile tables."""


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
    profile: dict | None = None  # --profile: summarize_profile's dict
    compiled: dict | None = None  # --compile: compiled_training's dict


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


def kernel_category(name: str) -> str:
    """The category of a CUDA kernel's or a CPU op's name (`KERNEL_CATEGORIES`), "other" if none matches."""
    lowered = name.lower()
    return next((category for category, parts in KERNEL_CATEGORIES if any(p in lowered for p in parts)), "other")


def short_name(name: str, width: int = 60) -> str:
    """`name` without `void ` and ATen's namespaces, cut to `width` characters."""
    for noise in ("void ", "at::native::", "(anonymous namespace)::"):
        name = name.replace(noise, "")
    return name if len(name) <= width else name[:width - 3] + "..."


def _synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


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


def summarize_profile(events: list[tuple[str, int, float]], steps: int, source: str) -> dict:
    """Per-step milliseconds by category and the `TOP_KERNELS` longest of (name, calls, microseconds) over
    `steps` steps."""
    categories = dict.fromkeys(CATEGORIES, 0.0)
    for name, _, us in events:
        categories[kernel_category(name)] += us / 1000 / steps
    top = sorted(events, key=lambda event: event[2], reverse=True)[:TOP_KERNELS]
    return {"source": source, "steps": steps, "total_ms": sum(categories.values()), "categories": categories,
            "top": [{"name": name, "category": kernel_category(name), "calls_per_step": calls / steps,
                     "ms_per_step": us / 1000 / steps} for name, calls, us in top]}


def _device_us(kernel) -> float:
    """An averaged kernel's device microseconds (`cuda_time_total` in older torch)."""
    us = getattr(kernel, "device_time_total", None)
    return us if us is not None else kernel.cuda_time_total


def _profiled_times(averages, on_cuda: bool) -> list[tuple[str, int, float]]:
    """(name, calls, microseconds) of key_averages()' CUDA kernels (device time), or CPU ops (self CPU time)."""
    from torch.autograd import DeviceType

    if on_cuda:
        times = [(e.key, e.count, _device_us(e)) for e in averages if e.device_type != DeviceType.CPU]
    else:
        times = [(e.key, e.count, e.self_cpu_time_total) for e in averages]
    return [event for event in times if event[2] > 0]


def profile_training(train_step: Callable[[], None], device, steps: int = PROFILE_STEPS) -> dict:
    """torch.profiler over `steps` training steps after one more warm-up: summarize_profile of the CUDA kernels'
    device time, on the CPU of the ops' self CPU time."""
    from torch.profiler import ProfilerActivity, profile

    on_cuda = device.type == "cuda"
    train_step()
    _synchronize(device)
    with profile(activities=[ProfilerActivity.CUDA if on_cuda else ProfilerActivity.CPU]) as profiler:
        for _ in range(steps):
            train_step()
        _synchronize(device)
    source = "CUDA kernels, device time" if on_cuda else "CPU ops, self CPU time"
    return summarize_profile(_profiled_times(profiler.key_averages(), on_cuda), steps, source)


def _one_line(error: Exception, width: int = 200) -> str:
    """The error's type and first message line (with the next one if the first ends in a colon)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    message = " ".join(lines[:2] if len(lines) > 1 and lines[0].endswith(":") else lines[:1])
    text = f"{type(error).__name__}: {message}" if message else type(error).__name__
    return text if len(text) <= width else text[:width - 3] + "..."


def compiled_training(make_step: Callable, network, device, warmup: int, repeats: int,
                      backend: str | None = None, profile: bool = False) -> dict:
    """`make_step`'s training step of `torch.compile(network)` (default mode), its Mamba layers on scan `backend`
    (None: as chosen for eager): compile time (the first step's wall seconds), median step ms after warm-up, peak
    GiB, graph breaks and their reasons, with `profile` profile_training's dict; {"error": line} if compiling or
    running fails."""
    import torch
    from torch._dynamo.utils import counters

    from nnunet_segmamba.mamba import use_backend

    torch._dynamo.reset()
    counters["graph_break"].clear()
    use_backend(network, backend)
    try:
        step = make_step(torch.compile(network))
        begin = time.perf_counter()
        step()
        _synchronize(device)
        compile_s = time.perf_counter() - begin
        step_ms = _timer(device)(step, warmup, repeats)
        peak = _peak(device, step)
        profiled = {"profile": profile_training(step, device)} if profile else {}
    except Exception as error:  # any failure of dynamo, inductor or the compiled code becomes the row's error
        return {"error": _one_line(error)}
    finally:
        torch._dynamo.reset()  # frees the compiled code before the next network
        use_backend(network, None)
    reasons = counters["graph_break"]
    return {"step_ms": step_ms, "compile_s": compile_s, "peak_gib": peak, "graph_breaks": sum(reasons.values()),
            "graph_break_reasons": sorted({reason.splitlines()[0] for reason in reasons}), **profiled}


def _autocast(device, dtype):
    import torch

    return torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()


def training_step(network, x, targets: list, device, dtype) -> Callable[[], None]:
    """One training step of `network` on `x`: forward, deep-supervised cross-entropy, backward, SGD step, under
    autocast to `dtype` (None: fp32) with a GradScaler for float16."""
    import torch
    import torch.nn.functional as F

    weights = [1 / 2**i for i in range(len(targets))]
    optimizer = torch.optim.SGD(network.parameters(), lr=1e-3, momentum=0.99, nesterov=True)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)

    def train_step():
        optimizer.zero_grad(set_to_none=True)
        with _autocast(device, dtype):
            outputs = network(x)
            loss = sum(w * F.cross_entropy(o.float(), t) for w, o, t in zip(weights, outputs, targets)) / sum(weights)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    return train_step


def benchmark_network(trainer_name: str, network, patch_size, batch_size: int, in_channels: int, num_classes: int,
                      device, amp: str, warmup: int, repeats: int, *, profile: bool = False,
                      compiled: bool = False, compiled_backend: str | None = None) -> Result:
    """Times one network; `network` has deep supervision on. `profile`: also profile_training (of the compiled
    step too); `compiled`: also compiled_training on scan `compiled_backend`."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    network = network.to(device)
    dtype = getattr(torch, AMP[amp]) if AMP[amp] else None
    generator = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(batch_size, in_channels, *patch_size, device=device, generator=generator)
    with torch.no_grad():
        shapes = [o.shape for o in network(x[:1])]
    targets = [torch.randint(0, num_classes, (batch_size, *s[2:]), device=device, generator=generator) for s in shapes]

    def make_step(net):
        return training_step(net, x, targets, device, dtype)

    train_step = make_step(network)
    median_ms = _timer(device)
    network.train()
    train_peak = _peak(device, train_step)
    train_ms = median_ms(train_step, warmup, repeats)

    network.eval()
    network.decoder.deep_supervision = False
    single = x[:1]

    def infer():
        with torch.no_grad(), _autocast(device, dtype):
            network(single)

    inference_peak = _peak(device, infer)
    inference_ms = median_ms(infer, warmup, repeats)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        network(single.float())
    network.decoder.deep_supervision = True
    params = sum(p.numel() for p in network.parameters())
    result = Result(trainer_name, params / 1e6, counter.get_total_flops() / 1e9, train_ms, train_peak, inference_ms,
                    inference_peak, f"{type(network).__module__}.{type(network).__qualname__}")
    network.train()
    if profile:
        result.profile = profile_training(train_step, device)
    if compiled:
        result.compiled = compiled_training(make_step, network, device, warmup, repeats, compiled_backend, profile)
    return result


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
    parser.add_argument("--profile", action="store_true", help=f"also profile {PROFILE_STEPS} training steps of each "
                        "network with torch.profiler: time per kernel category (scan, convolution, matmul, ...) and "
                        f"the top {TOP_KERNELS} kernels, in ms per step (CUDA kernels' device time; on the CPU the "
                        "ops' self CPU time); with --compile the compiled step's too")
    parser.add_argument("--compile", action="store_true", help="also time the training step with "
                        "torch.compile(network) (default mode), as nnUNetv2_train runs it on CUDA: step time and "
                        "speed-up over eager, compile time (the first step), peak memory, graph breaks; a network "
                        "that fails to compile shows the error")
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


def format_profile(trainer: str, profile: dict, step_ms: float) -> str:
    """A profile_training dict as a table of categories (ms per step, % of the profiled total) and the top
    kernels; `step_ms`: the timed step."""
    total = profile["total_ms"]
    lines = [f"{trainer}: {total:.1f} ms per step of {profile['source']} (timed step {step_ms:.1f} ms), "
             f"{profile['steps']} steps profiled",
             f"  {'category':<14} {'ms/step':>9} {'%':>6}"]
    lines += [f"  {category:<14} {ms:9.2f} {100 * ms / total if total else 0:6.1f}"
              for category, ms in profile["categories"].items()]
    lines.append(f"  {'top kernels':<60} {'category':<14} {'calls/step':>10} {'ms/step':>9}")
    lines += [f"  {short_name(k['name']):<60} {k['category']:<14} {k['calls_per_step']:10.1f} {k['ms_per_step']:9.2f}"
              for k in profile["top"]]
    return "\n".join(lines)


def format_compiled(results: list[Result]) -> str:
    """The --compile table (compiled step ms, speed-up over eager, peak, compile seconds and graph breaks, or the
    error), then the graph breaks' reasons."""
    header = (f"{'trainer (torch.compile)':<34} {'step ms':>9} {'speed-up':>9} {'peak GiB':>9} {'compile s':>10} "
              f"{'graph breaks':>13}")
    lines = [header, "-" * len(header)]
    for r in results:
        c = r.compiled
        if "error" in c:
            lines.append(f"{r.trainer:<34} error: {c['error']}")
            continue
        peak = f"{c['peak_gib']:9.2f}" if c["peak_gib"] is not None else f"{'-':>9}"
        lines.append(f"{r.trainer:<34} {c['step_ms']:9.1f} {r.train_step_ms / c['step_ms']:9.2f} {peak} "
                     f"{c['compile_s']:10.1f} {c['graph_breaks']:13d}")
    lines += [f"graph breaks of {r.trainer}: {'; '.join(r.compiled['graph_break_reasons'])}"
              for r in results if r.compiled.get("graph_break_reasons")]
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    import torch
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunet_segmamba.mamba import backend_for_compile, describe_backend, use_backend
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
        use_backend(network, None)  # eager: the environment's scan (under nnUNet_compile the build sets another)
        print(f"  {name} ...", flush=True)
        results.append(benchmark_network(name, network, configuration.patch_size, batch_size, in_channels,
                                         num_classes, device, args.amp, args.warmup, args.repeats,
                                         profile=args.profile, compiled=args.compile,
                                         compiled_backend=compiled_backend))
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
    if args.profile:
        for result in results:
            print()
            print(format_profile(result.trainer, result.profile, result.train_step_ms))
            if "profile" in (result.compiled or {}):
                print()
                print(format_profile(f"{result.trainer} (torch.compile)", result.compiled["profile"],
                                     result.compiled["step_ms"]))
    if args.compile:
        print()
        print(format_compiled(results))
        print("(speed-up: eager step ms / compiled step ms; compile s: wall time of the first compiled step)")
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
