"""The exact PyTorch scan on the CPU (the path of every CPU training and inference): forward, and forward +
backward, at the shapes of the Mamba stages of the demo's and the brain task's plans, in CPU milliseconds of this
process (less sensitive to other load than wall time). Any checkout's scan: run it with PYTHONPATH=<checkout>.

    python3 benchmarks/cpu_scan.py [--threads 1] [--repeats 5]
"""

from __future__ import annotations

import argparse
import time

import torch

from nnunet_segmamba.mamba.scan import selective_scan

SHAPES = {  # name: (batch, channels (K orders x d_inner), groups (K), tokens)
    "demo, SegMamba-V2 at 4x6x6 (d_model 128)": (2, 3 * 256, 3, 144),
    "brain, SegMamba-V2 at 7x8x7 (d_model 256)": (2, 3 * 512, 3, 392),
    "brain, SegMamba at 14x16x14 (d_model 128)": (2, 3 * 256, 3, 3136),
    "brain, MambaClinix at 14x16x14 (d_model 128)": (2, 256, 1, 3136),
}


def cpu_ms(fn, repeats: int) -> float:
    """The fastest of `repeats` calls after one warm-up, in CPU milliseconds of this process."""
    fn()
    times = []
    for _ in range(repeats):
        begin = time.process_time()
        fn()
        times.append(1000 * (time.process_time() - begin))
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"exact PyTorch scan, d_state 16, fp32, {args.threads} thread(s); CPU ms, fastest of {args.repeats}")
    for name, (batch, channels, groups, length) in SHAPES.items():
        g = torch.Generator().manual_seed(0)
        u = torch.randn(batch, channels, length, generator=g, requires_grad=True)
        delta = (0.1 * torch.rand(batch, channels, length, generator=g)).requires_grad_()
        A = (-0.5 - torch.rand(channels, 16, generator=g)).requires_grad_()
        B, C = (torch.randn(batch, groups, 16, length, generator=g, requires_grad=True) for _ in range(2))

        def forward():
            with torch.no_grad():
                selective_scan(u, delta, A, B, C)

        def forward_backward():
            selective_scan(u, delta, A, B, C).square().mean().backward()

        print(f"  {name:<46} forward {cpu_ms(forward, args.repeats):8.1f}   forward + backward "
              f"{cpu_ms(forward_backward, args.repeats):8.1f}", flush=True)


if __name__ == "__main__":
    main()
