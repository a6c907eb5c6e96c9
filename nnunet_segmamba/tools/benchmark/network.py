"""One network's costs at a patch and batch size: parameters, forward GFLOPs, training-step and one-patch
inference time and peak memory, with --profile and --compile their extras; a `Result` row."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from nnunet_segmamba.tools.benchmark.compiled import compiled_training
from nnunet_segmamba.tools.benchmark.profiling import profile_training
from nnunet_segmamba.tools.benchmark.timing import autocast, median_timer, peak_gib, random_batch, training_step

if TYPE_CHECKING:
    import torch

AMP = {"fp16": "float16", "bf16": "bfloat16", "fp32": None}


@dataclass
class Result:
    """One network's row of the tables and of the JSON's "results": times in ms (`volume_s` in seconds), peaks in
    GiB (None on the CPU), parameters in millions, GFLOPs of one forward at batch 1."""

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


def benchmark_network(trainer_name: str, network: torch.nn.Module, patch_size: list[int], batch_size: int,
                      in_channels: int, num_classes: int, device: torch.device, amp: str, warmup: int, repeats: int,
                      *, profile: bool = False, compiled: bool = False,
                      compiled_backend: str | None = None) -> Result:
    """Times one network on a random (batch, in_channels, *patch_size) input (inference: batch 1); `network` has
    deep supervision on. `profile`: also profile_training (of the compiled step too); `compiled`: also
    compiled_training on scan `compiled_backend`."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    network = network.to(device)
    dtype = getattr(torch, AMP[amp]) if AMP[amp] else None
    x, targets = random_batch(network, batch_size, in_channels, patch_size, num_classes, device)

    def make_step(net):
        return training_step(net, x, targets, device, dtype)

    train_step = make_step(network)
    median_ms = median_timer(device)
    network.train()
    train_peak = peak_gib(device, train_step)
    train_ms = median_ms(train_step, warmup, repeats)

    network.eval()
    network.decoder.deep_supervision = False
    single = x[:1]

    def infer():
        with torch.no_grad(), autocast(device, dtype):
            network(single)

    inference_peak = peak_gib(device, infer)
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
