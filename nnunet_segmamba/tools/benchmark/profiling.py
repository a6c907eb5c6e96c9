"""`--profile`: where a training step's time goes. torch.profiler over a few steps; the device time of the CUDA
kernels (on the CPU the ops' self CPU time) per category (`kernel_category`) and the top kernels, in ms per step."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from nnunet_segmamba.tools.benchmark.timing import synchronize

if TYPE_CHECKING:
    import torch

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


def kernel_category(name: str) -> str:
    """The category of a CUDA kernel's or a CPU op's name (`KERNEL_CATEGORIES`), "other" if none matches."""
    lowered = name.lower()
    return next((category for category, parts in KERNEL_CATEGORIES if any(p in lowered for p in parts)), "other")


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


def profile_training(train_step: Callable[[], None], device: torch.device, steps: int = PROFILE_STEPS) -> dict:
    """torch.profiler over `steps` training steps after one more warm-up: summarize_profile of the CUDA kernels'
    device time, on the CPU of the ops' self CPU time."""
    from torch.profiler import ProfilerActivity, profile

    on_cuda = device.type == "cuda"
    train_step()
    synchronize(device)
    with profile(activities=[ProfilerActivity.CUDA if on_cuda else ProfilerActivity.CPU]) as profiler:
        for _ in range(steps):
            train_step()
        synchronize(device)
    source = "CUDA kernels, device time" if on_cuda else "CPU ops, self CPU time"
    return summarize_profile(_profiled_times(profiler.key_averages(), on_cuda), steps, source)
