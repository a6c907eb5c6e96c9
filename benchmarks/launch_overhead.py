#!/usr/bin/env python3
"""GPU experiment (not run by CI): what a kernel launch costs the host, Triton's against ATen's, and the host time
of a whole Mamba layer's forward + backward per scan backend where the GPU waits on the host.

    python3 benchmarks/launch_overhead.py      (`benchmarks/gpu launch-overhead`, on the GPU machine)

Host us per launch: `CALLS` launches enqueued back to back on tiny tensors (the GPU drains them faster than they
come), timed on the host clock, the synchronization after them not counted; medians of `REPEATS` rounds. Rows: an
ATen in-place add; a Triton kernel with 3 and with 25 integer arguments (our scan's backward passes 25 at run time,
the order kernels 16); `_into_order_kernel` launched as `triton_orders` launches it. Then the tri-orientated layer
(d_model 32, batch 1) at 4^3 and 8^3 tokens, forward + backward, eager: host ms per step (enqueueing) against wall ms
per step (synchronized each step). Where host ms is most of wall ms, fewer launches pay (BENCHMARKS.md, "The Mamba
layer's kernels per backend": 21 Triton launches per layer forward + backward).
"""

import statistics
import time

import torch
import triton
import triton.language as tl

from nnunet_segmamba.mamba import Mamba, tom_orders
from nnunet_segmamba.mamba.backends import GPU_OPS
from nnunet_segmamba.mamba.triton_orders import BLOCKS, _into_order_kernel, _launch_grid, _walks
from nnunet_segmamba.tools.scan_benchmark import _median_ms

CALLS, REPEATS = 200, 7


@triton.jit
def _touch3(x, a, b, BLOCK: tl.constexpr):
    """Writes a + b into x's first BLOCK elements: a kernel that does next to nothing."""
    tl.store(x + tl.arange(0, BLOCK), tl.zeros((BLOCK,), tl.float32) + a + b)


@triton.jit
def _touch25(x, a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, a12, a13, a14, a15, a16, a17, a18, a19, a20,
             a21, a22, a23, BLOCK: tl.constexpr):
    """`_touch3` with 25 arguments, as many as the scan's backward kernel takes at run time."""
    tl.store(x + tl.arange(0, BLOCK), tl.zeros((BLOCK,), tl.float32) + a0 + a23)


def host_us(launch) -> float:
    """Median host microseconds per call of `launch` over REPEATS rounds of CALLS calls (after one round)."""
    rounds = []
    for _ in range(REPEATS + 1):
        torch.cuda.synchronize()
        begin = time.perf_counter()
        for _ in range(CALLS):
            launch()
        rounds.append((time.perf_counter() - begin) / CALLS * 1e6)
    torch.cuda.synchronize()
    return statistics.median(rounds[1:])


def layer_ms(layer, x, grid) -> tuple[float, float]:
    """(host ms, wall ms) per forward + backward of `layer` on x: enqueueing only, and synchronized each step."""
    def step():
        layer(x, grid).sum().backward()

    return host_us(step) / 1000, _median_ms(step, torch.device("cuda"), REPEATS, 2 * REPEATS)


def launches(device: torch.device) -> tuple[dict, torch.Tensor, torch.Tensor, torch.Tensor]:
    """({row: a function making one launch}, x, tokens, gathered): tiny tensors on `device`; the Triton kernels
    write into x, the order kernel gathers tokens (1, 4^3, 16) in the inter-slice order into gathered (1, 16, 64)."""
    x = torch.zeros(64, device=device)
    ints = list(range(1, 25))
    tokens = torch.randn(1, 64, 16, device=device)
    gathered = torch.empty(1, 16, 64, device=device)
    walk = _walks((4, 4, 4), tom_orders(3))[2]
    return {
        "ATen x.add_(1)": lambda: x.add_(1),
        "Triton, 3 arguments": lambda: _touch3[(1,)](x, 1, 2, BLOCK=64),
        "Triton, 25 arguments": lambda: _touch25[(1,)](x, *ints, BLOCK=64),
        "_into_order_kernel (16 at run time)": lambda: _into_order_kernel[_launch_grid(1, 64, 16)](
            tokens, tokens, tokens, gathered, 64, 16, tokens.stride(0), tokens.stride(1), 0, 16, *walk, TAPS=1,
            HAS_WEIGHT=False, HAS_BIAS=False, SILU=False, **BLOCKS),
    }, x, tokens, gathered


def main() -> None:
    device = torch.device("cuda")
    rows, *_ = launches(device)
    print(f"Host time per launch, {torch.cuda.get_device_name(device)}, torch {torch.__version__}, Triton "
          f"{triton.__version__}; {CALLS} launches per round, median of {REPEATS} rounds")
    print(f"{'launch':<40} {'host us':>8}")
    for name, launch in rows.items():
        print(f"{name:<40} {host_us(launch):8.1f}", flush=True)

    print("\nTri-orientated Mamba layer, d_model 32, batch 1, fp32, forward + backward, eager")
    print(f"{'tokens':>8} {'backend':>8} {'host ms':>8} {'wall ms':>8} {'host/wall':>9}")
    for grid in ((4, 4, 4), (8, 8, 8)):
        for backend in GPU_OPS:
            if GPU_OPS[backend](device.index or 0)[0] is None:
                print(f"{'x'.join(map(str, grid)):>8} {backend:>8} not available here")
                continue
            layer = Mamba(32, orders=tom_orders(3), backend=backend).to(device)
            inputs = torch.randn(1, grid[0] * grid[1] * grid[2], 32, device=device, requires_grad=True)
            host, wall = layer_ms(layer, inputs, grid)
            print(f"{'x'.join(map(str, grid)):>8} {backend:>8} {host:8.2f} {wall:8.2f} {host / wall:9.2f}", flush=True)


if __name__ == "__main__":
    main()
