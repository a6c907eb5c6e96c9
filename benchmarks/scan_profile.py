"""Where the Triton scan's time goes, beside mamba-ssm's kernel: the scan alone, forward + backward, batch 2, at the
tri-orientated layer's stages (`scan_benchmark.STAGES`, `scan_inputs`).

    python3 benchmarks/scan_profile.py [--dtype bf16]      wall ms per step and each kernel's device us per step
                                                          (torch.profiler), per stage and backend
    python3 benchmarks/scan_profile.py --once              one step per stage of the Triton scan after a warm-up
                                                          step: the program `ncu --profile-from-start off` profiles
    python3 benchmarks/scan_profile.py --ncu-summary F.csv  condense `ncu --csv --page details` output: per kernel
                                                          launch duration, occupancy, throughputs, top stalls
    python3 benchmarks/scan_profile.py --layer [--dtype fp16]  the same breakdown for the whole tri-orientated Mamba
                                                          layer, cuda and triton backends, eager and compiled

`benchmarks/gpu profile-scan` runs the first three on the GPU machine, `benchmarks/gpu profile-layer` the last.
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections import defaultdict

from nnunet_segmamba.tools.benchmark.network import AMP

STALL = "issue_stalled_"
SHOWN = {"Duration": "us", "Achieved Occupancy": "occ %", "Memory Throughput": "mem %", "DRAM Throughput": "dram %",
         "Compute (SM) Throughput": "sm %", "L1/TEX Cache Throughput": "L1 %", "L1/TEX Hit Rate": "L1 hit %",
         "L2 Hit Rate": "L2 hit %",
         "Registers Per Thread": "regs", "Warp Cycles Per Issued Instruction": "cyc/inst", "Grid Size": "grid"}
"""ncu's details-page metrics shown, with their column names (Duration in us whatever unit ncu gives)."""


def kernel_times(step, steps: int = 5) -> dict[str, tuple[int, float]]:
    """{kernel name: (calls per step, device us per step)} over `steps` calls of `step` (after one more)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from nnunet_segmamba.tools.benchmark.profiling import _device_us

    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as profiler:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    return {e.key: (e.count // steps, _device_us(e) / steps) for e in profiler.key_averages()
            if e.device_type.name != "CPU" and _device_us(e) > 0}


def print_kernels(title: str, step, device, shown: int | None = None) -> None:
    """`title`, the wall ms of `step` (median of 10) and its kernels' device us per step, longest first (the
    first `shown`, and the rest summed)."""
    from nnunet_segmamba.tools.scan_benchmark import _median_ms

    wall = _median_ms(step, device, 3, 10)
    kernels = sorted(kernel_times(step).items(), key=lambda item: -item[1][1])
    busy = sum(us for _, (_, us) in kernels) / 1000
    print(f"\n{title}: wall {wall:.3f} ms, kernels {busy:.3f} ms ({len(kernels)} kinds, "
          f"{sum(calls for _, (calls, _) in kernels)} launches)")
    for kernel, (calls, us) in kernels[:shown]:
        print(f"  {us:9.1f} us {calls:3d}x  {kernel[:100]}")
    rest = kernels[shown:] if shown is not None else []
    if rest:
        calls = sum(calls for _, (calls, _) in rest)
        print(f"  {sum(us for _, (_, us) in rest):9.1f} us {calls:3d}x  ({len(rest)} other kinds)")


def breakdown(dtype_name: str) -> None:
    """Per stage, per backend: wall ms of a step (median of 10) and its kernels' device us, longest first."""
    import torch

    from nnunet_segmamba.tools.scan_benchmark import STAGES, gpu_scans, scan_inputs, scan_step

    device = torch.device("cuda", torch.cuda.current_device())
    dtype = getattr(torch, AMP[dtype_name] or "float32")
    scans = gpu_scans(device)
    print(f"Selective scan alone, forward + backward, batch 2, {dtype_name}, {torch.cuda.get_device_name(device)}")
    for d_model, grid in STAGES:
        arguments, grad = scan_inputs(d_model, grid, 2, dtype, device)
        for name, scan in scans.items():
            print_kernels(f"{d_model} @ {'x'.join(map(str, grid))} {name}",
                          lambda: scan_step(scan, arguments, grad), device)


def layer_breakdown(dtype_name: str, shown: int = 12, stages=None) -> None:
    """Per stage (d_model, token grid; default `scan_benchmark.STAGES`): the tri-orientated Mamba layer's forward +
    backward (batch 2, autocast `dtype_name`) with each GPU backend, eager and compiled (static shapes, as our
    trainers compile): wall ms and its `shown` longest kernels."""
    import copy

    import torch

    from nnunet_segmamba.mamba import Mamba, plane_orders, use_backend
    from nnunet_segmamba.tools.scan_benchmark import STAGES, layer_step

    device = torch.device("cuda", torch.cuda.current_device())
    dtype = getattr(torch, AMP[dtype_name] or "float32")
    print(f"Tri-orientated Mamba layer, forward + backward, batch 2, {dtype_name} autocast, "
          f"{torch.cuda.get_device_name(device)}")
    for d_model, grid in stages or STAGES:
        torch.manual_seed(0)
        layer = Mamba(d_model, orders=plane_orders(3)).to(device)
        x = torch.randn(2, grid[0] * grid[1] * grid[2], d_model, device=device)
        torch._dynamo.reset()  # each stage compiled afresh, for its static shapes
        for backend in ("cuda", "triton"):
            ours = copy.deepcopy(layer)
            use_backend(ours, backend)
            for mode, run in (("eager", ours), ("compiled", torch.compile(ours, dynamic=False))):
                print_kernels(f"{d_model} @ {'x'.join(map(str, grid))} {backend} {mode}",
                              lambda: layer_step(run, x, grid, dtype), device, shown)


def once() -> None:
    """A warm-up step, then one step per stage of the Triton scan, bf16: what ncu profiles."""
    import torch

    from nnunet_segmamba.mamba.triton_scan import triton_selective_scan
    from nnunet_segmamba.tools.scan_benchmark import STAGES, scan_inputs, scan_step

    device = torch.device("cuda", torch.cuda.current_device())
    stages = [scan_inputs(d_model, grid, 2, torch.bfloat16, device) for d_model, grid in STAGES]
    for arguments, grad in stages:  # compiles the kernels before ncu's launch window (see --launch-skip)
        scan_step(triton_selective_scan, arguments, grad)
    torch.cuda.synchronize()
    torch.cuda.profiler.start()  # ncu --profile-from-start off: only what follows
    for (d_model, grid), (arguments, grad) in zip(STAGES, stages):
        print(f"profiled stage {d_model} @ {'x'.join(map(str, grid))}", flush=True)
        scan_step(triton_selective_scan, arguments, grad)
        torch.cuda.synchronize()
    torch.cuda.profiler.stop()


def ncu_summary(path: str) -> None:
    """One line per profiled kernel launch of `ncu --csv --page details` output (`SHOWN` and the three largest
    stall reasons, in warp cycles per issued instruction)."""
    metrics: dict[str, dict[str, tuple[str, str]]] = defaultdict(dict)
    names: dict[str, str] = {}
    with open(path) as file:
        lines = [line for line in file if line.startswith('"')]  # ncu's own messages are not CSV rows
    for row in csv.DictReader(lines):
        names[row["ID"]] = row["Kernel Name"]
        if metrics[row["ID"]].get(row["Metric Name"], ("", ""))[1] != "%":  # "Memory Throughput": % and byte/s
            metrics[row["ID"]][row["Metric Name"]] = (row["Metric Value"], row["Metric Unit"])
        metrics[row["ID"]].setdefault("Grid Size", (row.get("Grid Size", ""), ""))
    print(f"{'id':>3} {'kernel':<22} " + " ".join(f"{column:>9}" for column in SHOWN.values()) + "  top stalls")
    for launch, values in metrics.items():
        cells = []
        for metric in SHOWN:
            value, unit = values.get(metric, ("-", ""))
            if metric == "Duration" and value != "-":
                value = f"{float(value.replace(',', '')) * {'ns': 1e-3, 'ms': 1e3, 's': 1e6}.get(unit, 1):.1f}"
            cells.append(f"{value:>9}")
        stalls = sorted(((float(v.replace(",", "")), k.split(STALL, 1)[1].split("_per_")[0])
                         for k, (v, _) in values.items()
                         if STALL in k and v.replace(",", "").replace(".", "").isdigit()), reverse=True)[:3]
        print(f"{launch:>3} {names[launch][:22]:<22} " + " ".join(cells) + "  "
              + ", ".join(f"{reason} {value:.1f}" for value, reason in stalls))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="bf16", choices=list(AMP))
    parser.add_argument("--once", action="store_true")
    parser.add_argument("--ncu-summary", metavar="CSV")
    parser.add_argument("--layer", action="store_true")
    args = parser.parse_args()
    if args.ncu_summary:
        ncu_summary(args.ncu_summary)
    elif args.layer:
        layer_breakdown(args.dtype)
    elif args.once:
        once()
    else:
        breakdown(args.dtype)
    sys.exit(0)
