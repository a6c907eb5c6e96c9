"""What the benchmark measures with: median milliseconds of a function after warm-up (CUDA events on a GPU, wall
clock on the CPU), its peak allocated GiB, the training step it times, and nnU-Net's sliding-window prediction."""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager


def cudnn_as_nnunet() -> None:
    """cuDNN as `nnUNetv2_train` and `nnUNetv2_predict` set it on CUDA: autotuned convolution algorithms (benchmark
    on), not deterministic (no effect off CUDA). Set before the first network is measured: nnU-Net's predictor turns
    benchmark on when created, so without this the rows before the first --predict-volume would run on cuDNN's
    heuristics and the later ones autotuned."""
    import torch

    torch.backends.cudnn.benchmark = True
    torch.backends.cudnn.deterministic = False


def synchronize(device: torch.device) -> None:
    """Waits for `device`'s queued work (a no-op on the CPU)."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_timer(device: torch.device) -> Callable[[Callable[[], None], int, int], float]:
    """A function running `fn` `warmup` times, then `repeats` times, and returning the median milliseconds of the
    latter."""
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


def peak_gib(device: torch.device, fn: Callable[[], None]) -> float | None:
    """GiB allocated at the peak of one call of `fn` on a CUDA `device`; None on the CPU (`fn` still runs)."""
    import torch

    if device.type != "cuda":
        fn()
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) / 2**30


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """torch.autocast to `dtype` on `device`; None: no autocast (fp32)."""
    import torch

    return torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()


def random_batch(network: torch.nn.Module, batch_size: int, in_channels: int, patch_size: list[int],
                 num_classes: int, device: torch.device) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A seeded random input (batch_size, in_channels, *patch_size) and label maps at the resolution of each of
    `network`'s (deep-supervised) outputs, for `training_step`."""
    import torch

    generator = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(batch_size, in_channels, *patch_size, device=device, generator=generator)
    with torch.no_grad():
        shapes = [o.shape for o in network(x[:1])]
    targets = [torch.randint(0, num_classes, (batch_size, *s[2:]), device=device, generator=generator) for s in shapes]
    return x, targets


def training_step(network: torch.nn.Module, x: torch.Tensor, targets: list, device: torch.device,
                  dtype: torch.dtype | None) -> Callable[[], None]:
    """One training step of `network` on `x`: forward, deep-supervised cross-entropy, backward, SGD step, under
    autocast to `dtype` (None: fp32) with a GradScaler for float16."""
    import torch
    import torch.nn.functional as F

    weights = [1 / 2**i for i in range(len(targets))]
    optimizer = torch.optim.SGD(network.parameters(), lr=1e-3, momentum=0.99, nesterov=True)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)

    def train_step():
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, dtype):
            outputs = network(x)
            loss = sum(w * F.cross_entropy(o.float(), t) for w, o, t in zip(weights, outputs, targets)) / sum(weights)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    return train_step


def predict_volume_seconds(network: torch.nn.Module, plans_manager: PlansManager,
                           configuration: ConfigurationManager, num_classes: int, shape: list[int],
                           device: torch.device) -> float:
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
        synchronize(device)
        begin = time.perf_counter()
        predictor.predict_sliding_window_return_logits(volume)
        synchronize(device)
    return time.perf_counter() - begin
