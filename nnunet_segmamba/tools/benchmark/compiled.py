"""`--compile`: the training step with `torch.compile(network)` (default mode): compile time, step time after
warm-up, peak memory and graph breaks, or the error of a network that fails to compile."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from nnunet_segmamba.tools.benchmark.profiling import profile_training
from nnunet_segmamba.tools.benchmark.timing import median_timer, peak_gib, synchronize

if TYPE_CHECKING:
    import torch


def _one_line(error: Exception, width: int = 200) -> str:
    """The error's type and first message line (with the next one if the first ends in a colon)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    message = " ".join(lines[:2] if len(lines) > 1 and lines[0].endswith(":") else lines[:1])
    text = f"{type(error).__name__}: {message}" if message else type(error).__name__
    return text if len(text) <= width else text[:width - 3] + "..."


def compiled_training(make_step: Callable[[torch.nn.Module], Callable[[], None]], network: torch.nn.Module,
                      device: torch.device, warmup: int, repeats: int, backend: str | None = None,
                      profile: bool = False) -> dict:
    """`make_step`'s training step of `torch.compile(network)` (default mode), its Mamba layers on scan `backend`
    (None: as chosen for eager): compile time (the first step's wall seconds), median step ms after warm-up, peak
    GiB, graph breaks and their reasons, the scan `backend`, with `profile` profile_training's dict; {"error": line}
    if compiling or running fails."""
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
        synchronize(device)
        compile_s = time.perf_counter() - begin
        step_ms = median_timer(device)(step, warmup, repeats)
        peak = peak_gib(device, step)
        profiled = {"profile": profile_training(step, device)} if profile else {}
    except Exception as error:  # any failure of dynamo, inductor or the compiled code becomes the row's error
        return {"error": _one_line(error)}
    finally:
        torch._dynamo.reset()  # frees the compiled code before the next network
        use_backend(network, None)
    reasons = counters["graph_break"]
    return {"step_ms": step_ms, "compile_s": compile_s, "peak_gib": peak, "graph_breaks": sum(reasons.values()),
            "graph_break_reasons": sorted({reason.splitlines()[0] for reason in reasons}), "backend": backend,
            **profiled}
