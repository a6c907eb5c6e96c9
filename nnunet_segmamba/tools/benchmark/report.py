"""The benchmark's output: the table of costs with ratios to the first row (a row per network, printed as it is
measured), the --profile and --compile tables, and the `-o` JSON."""

from __future__ import annotations

import math
from dataclasses import asdict
from typing import TYPE_CHECKING

from nnunet_segmamba.tools.benchmark.network import Result

if TYPE_CHECKING:
    import torch
    from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager


def short_name(name: str, width: int = 60) -> str:
    """`name` without `void ` and ATen's namespaces, cut to `width` characters."""
    for noise in ("void ", "at::native::", "(anonymous namespace)::"):
        name = name.replace(noise, "")
    return name if len(name) <= width else name[:width - 3] + "..."


def table_header(volumes: bool) -> str:
    """The table of costs' header (with `volumes` the --predict-volume columns) and its rule."""
    header = (f"{'trainer':<34} {'params M':>9} {'GFLOP':>8} {'step ms':>9} {'x ref':>6} {'peak GiB':>9} {'x ref':>6} "
              f"{'infer ms':>9} {'x ref':>6}" + (f" {'volume s':>9} {'x ref':>6}" if volumes else ""))
    return f"{header}\n{'-' * len(header)}"


def table_row(r: Result, reference: Result, volumes: bool) -> str:
    """One result's parameters, GFLOPs, step ms, peak GiB, inference ms (and volume seconds), each time and peak
    with its ratio to `reference`'s."""
    def ratio(value, base):
        return f"{value / base:6.2f}" if value is not None and base else f"{'-':>6}"
    peak = f"{r.train_peak_gib:9.2f}" if r.train_peak_gib is not None else f"{'-':>9}"
    return (f"{r.trainer:<34} {r.params_m:9.1f} {r.gflops_forward:8.0f} {r.train_step_ms:9.1f} "
            f"{ratio(r.train_step_ms, reference.train_step_ms)} {peak} {ratio(r.train_peak_gib, reference.train_peak_gib)} "
            f"{r.inference_ms:9.1f} {ratio(r.inference_ms, reference.inference_ms)}"
            + (f" {r.volume_s:9.2f} {ratio(r.volume_s, reference.volume_s)}" if volumes else ""))


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


def compiled_label(label: str, backend: str | None) -> str:
    """A --backends row's label ("SegMamba-V2 [cuda]") with the scan it was compiled on ("SegMamba-V2 [triton]"); other
    labels as they are."""
    return f"{label.split(' [')[0]} [{backend}]" if " [" in label and backend else label


def format_compiled(results: list[Result]) -> str:
    """The --compile table (compiled step ms, speed-up over eager, peak, compile seconds and graph breaks, or the
    error), then the graph breaks' reasons; rows not compiled (a network's further --backends rows) are left out."""
    results = [r for r in results if r.compiled is not None]
    header = (f"{'trainer (torch.compile)':<34} {'step ms':>9} {'speed-up':>9} {'peak GiB':>9} {'compile s':>10} "
              f"{'graph breaks':>13}")
    lines = [header, "-" * len(header)]
    for r in results:
        c = r.compiled
        if "error" in c:
            lines.append(f"{r.trainer:<34} error: {c['error']}")
            continue
        peak = f"{c['peak_gib']:9.2f}" if c["peak_gib"] is not None else f"{'-':>9}"
        label = compiled_label(r.trainer, c.get("backend"))
        lines.append(f"{label:<34} {c['step_ms']:9.1f} {r.train_step_ms / c['step_ms']:9.2f} {peak} "
                     f"{c['compile_s']:10.1f} {c['graph_breaks']:13d}")
    lines += [f"graph breaks of {r.trainer}: {'; '.join(r.compiled['graph_break_reasons'])}"
              for r in results if r.compiled.get("graph_break_reasons")]
    return "\n".join(lines)


def print_tables(results: list[Result], warmup: int, repeats: int, profile: bool, compiled: bool) -> None:
    """What follows the table of costs (whose rows `benchmark` prints as they are measured): its footnote, with
    `profile` each network's profile (eager, then compiled) and with `compiled` the --compile table."""
    print(f"(ratios relative to {results[0].trainer}; GFLOP: convolutions and matrix products of one forward, "
          f"batch 1; medians of {repeats} after {warmup} warm-up)")
    if profile:
        for result in results:
            print()
            print(format_profile(result.trainer, result.profile, result.train_step_ms))
            if "profile" in (result.compiled or {}):
                print()
                print(format_profile(f"{result.trainer} (torch.compile)", result.compiled["profile"],
                                     result.compiled["step_ms"]))
    if compiled:
        print()
        print(format_compiled(results))
        print("(speed-up: eager step ms / compiled step ms; compile s: wall time of the first compiled step)")


def results_json(configuration_name: str, configuration: ConfigurationManager, batch_size: int, in_channels: int,
                 num_classes: int, amp: str, device: torch.device, results: list[Result]) -> dict:
    """The `-o` file's content: the configuration benchmarked (with its network's arguments), the run's settings
    and GPU, and the results as dicts (NaN as null)."""
    import torch

    return {"configuration": configuration_name, "patch_size": configuration.patch_size,
            "batch_size": batch_size, "in_channels": in_channels, "num_classes": num_classes,
            "architecture": {"arch_kwargs": configuration.network_arch_init_kwargs,
                             "_kw_requires_import": configuration.network_arch_init_kwargs_req_import},
            "amp": amp, "device": str(device),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "results": [{k: (None if isinstance(v, float) and math.isnan(v) else v)
                         for k, v in asdict(r).items()} for r in results]}
