"""Launch settings of the Triton scan on this GPU: the scan alone (tri-orientated layer's channels, forward +
backward, batch 2) per setting of `triton_scan`'s module constants, against mamba-ssm's kernel, same run.

    source .device-kit/activate.sh; benchmarks/gpu sweep-triton   (on the GPU machine)
"""

import functools

import torch

from nnunet_segmamba.mamba import triton_scan
from nnunet_segmamba.tools.scan_benchmark import _relative, gpu_scans, scan_bandwidth

SETTINGS = [  # (PROGRAMS_PER_SM, NUM_WARPS, TILE, TILES, BLOCK_D, MIN_SEGMENT_BLOCKS), `triton_scan_tiles.py`'s
    # constants as `triton_scan` launches with them; the first and last: the defaults (the run's drift). Edit to try
    # others; the latest sweeps: BENCHMARKS.md, "Triton scan launch settings". Longer least segments: fewer launches
    # where the sequence is short (16: none at 8^3 tokens, 4 launches fewer per forward + backward).
    (16, 1, 2, 16, 16, 2), (16, 1, 4, 16, 16, 2), (16, 1, 2, 8, 16, 2), (8, 1, 2, 16, 16, 2), (16, 1, 2, 16, 16, 16),
    (16, 1, 2, 16, 16, 64), (16, 1, 2, 16, 16, 2),
]
NAMES = ("PROGRAMS_PER_SM", "NUM_WARPS", "TILE", "TILES", "BLOCK_D", "MIN_SEGMENT_BLOCKS")
LABELS = ("pps", "warps", "tile", "tiles", "bd", "minseg")
assert all(hasattr(triton_scan, name) for name in NAMES), "triton_scan no longer launches with these constants"

device = torch.device("cuda")
scans = gpu_scans(device)
FEW_CHANNELS = [(32, (32, 32, 32))]  # at batch 1: 192 one-channel programs, where segments pay
forward_backward = functools.partial(scan_bandwidth, device=device, warmup=3, repeats=10, no_grad_forward=False)
baseline = {(r["d_model"], r["dtype"]): r for r in forward_backward({"cuda": scans["cuda"]}, batch=2)}
few_baseline = forward_backward({"cuda": scans["cuda"]}, batch=1, stages=FEW_CHANNELS)


def errors(length=32768, dim=768, groups=3, d_state=16):
    """Relative error of out and of all gradients, triton vs cuda, fp32, at the largest stage."""
    g = torch.Generator(device=device).manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, device=device, generator=g)

    A = -torch.rand(dim, d_state, device=device, generator=g) - 0.5
    B, C = randn(2, groups, d_state, length), randn(2, groups, d_state, length)
    leaves = [randn(2, dim, length), 0.1 * randn(2, dim, length), A, B, C, torch.ones(dim, device=device),
              randn(2, dim, length), torch.zeros(dim, device=device)]
    results = []
    for scan in (scans["cuda"], triton_scan.triton_selective_scan):
        inputs = [t.clone().requires_grad_() for t in leaves]
        out = scan(*inputs[:7], delta_bias=inputs[7], delta_softplus=True)
        results.append([out, *torch.autograd.grad(out, inputs, torch.ones_like(out))])
    return max(_relative(a, b) for a, b in zip(results[1], results[0]))


print(f"{'setting':<64} {'d_model':>7} {'dtype':>8} | {'triton ms':>9} {'cuda ms':>8} {'triton/cuda':>11} "
      f"{'triton MiB':>10} {'cuda MiB':>8}")
for setting in SETTINGS:
    for name, value in zip(NAMES, setting):
        setattr(triton_scan, name, value)
    label = " ".join(f"{short}={v}" for short, v in zip(LABELS, setting))
    try:
        rows = forward_backward({"triton": triton_scan.triton_selective_scan}, batch=2)
        error = errors()
    except Exception as e:  # a setting that does not compile or run: report and go on
        print(f"{label:<64} failed: {str(e).splitlines()[0][:120]}")
        continue
    few_channels = forward_backward({"triton": triton_scan.triton_selective_scan}, batch=1, stages=FEW_CHANNELS)
    for r, base in zip(few_channels, few_baseline):
        print(f"{label:<64} {'32 b1':>7} {r['dtype']:>8} | {r['ms']:9.2f} {base['ms']:8.2f} "
              f"{r['ms'] / base['ms']:10.2f}x {r['extra_mib']:10.0f} {base['extra_mib']:8.0f}")
    for r in rows:
        base = baseline[(r["d_model"], r["dtype"])]
        print(f"{label:<64} {r['d_model']:>7} {r['dtype']:>8} | {r['ms']:9.2f} {base['ms']:8.2f} "
              f"{r['ms'] / base['ms']:10.2f}x {r['extra_mib']:10.0f} {base['extra_mib']:8.0f}")
    print(f"{label:<64} max relative error vs cuda (out, all grads, fp32, 32^3 tokens): {error:.1e}")
