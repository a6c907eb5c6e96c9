"""Where the Triton scan's time goes, beside mamba-ssm's kernel: the scan alone, forward + backward, batch 2, at the
tri-orientated layer's stages (`scan_benchmark.STAGES`, `scan_inputs`).

    python3 benchmarks/scan_profile.py [--dtype bf16]      wall ms per step and each kernel's device us per step
                                                          (torch.profiler), per stage and backend
    python3 benchmarks/scan_profile.py --once              one step per stage of the Triton scan after a warm-up
                                                          step: the program `ncu --profile-from-start off` profiles
    python3 benchmarks/scan_profile.py --ncu-summary F.csv  condense `ncu --csv --page details` output: per kernel
                                                          launch duration, occupancy, throughputs, top stalls

`benchmarks/gpu profile-scan` runs all three on the GPU machine.
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


def kernel_times(scan, arguments, grad, steps: int = 5) -> dict[str, tuple[int, float]]:
    """{kernel name: (calls per step, device us per step)} over `steps` forward + backward steps."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from nnunet_segmamba.tools.benchmark.profiling import _device_us
    from nnunet_segmamba.tools.scan_benchmark import scan_step

    scan_step(scan, arguments, grad)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as profiler:
        for _ in range(steps):
            scan_step(scan, arguments, grad)
        torch.cuda.synchronize()
    return {e.key: (e.count // steps, _device_us(e) / steps) for e in profiler.key_averages()
            if e.device_type.name != "CPU" and _device_us(e) > 0}


def breakdown(dtype_name: str) -> None:
    """Per stage, per backend: wall ms of a step (median of 10) and its kernels' device us, longest first."""
    import torch

    from nnunet_segmamba.tools.scan_benchmark import STAGES, _median_ms, gpu_scans, scan_inputs, scan_step

    device = torch.device("cuda", torch.cuda.current_device())
    dtype = getattr(torch, AMP[dtype_name] or "float32")
    scans = gpu_scans(device)
    print(f"Selective scan alone, forward + backward, batch 2, {dtype_name}, {torch.cuda.get_device_name(device)}")
    for d_model, grid in STAGES:
        arguments, grad = scan_inputs(d_model, grid, 2, dtype, device)
        for name, scan in scans.items():
            wall = _median_ms(lambda: scan_step(scan, arguments, grad), device, 3, 10)
            kernels = kernel_times(scan, arguments, grad)
            busy = sum(us for _, us in kernels.values()) / 1000
            print(f"\n{d_model} @ {'x'.join(map(str, grid))} {name}: wall {wall:.3f} ms, kernels {busy:.3f} ms "
                  f"({len(kernels)} kinds, {sum(calls for calls, _ in kernels.values())} launches)")
            for kernel, (calls, us) in sorted(kernels.items(), key=lambda item: -item[1][1]):
                print(f"  {us:9.1f} us {calls:3d}x  {kernel[:100]}")


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
    args = parser.parse_args()
    if args.ncu_summary:
        ncu_summary(args.ncu_summary)
    elif args.once:
        once()
    else:
        breakdown(args.dtype)
    sys.exit(0)
