#!/usr/bin/env python3
"""Issue 31's speed and memory targets, read from `nnunet-segmamba benchmark -o` JSON files: each network's ratio
to PlainConvUNet of the same run, met or missed.

    python3 benchmarks/speed_targets.py RUN.json [RUN.json ...]     (`benchmarks/gpu speed-table` writes one)

A ratio is taken within one file only (one run: the rows of another run vary), against that file's
``nnUNetTrainer`` row, so runs that measured different networks merge. The compiled cells come from the row that
was compiled (`benchmark --compile`: Triton scan, as `nnUNetv2_train` compiles); the volume from the eager row on
our Triton scan (``[triton]``, or a row without a backend label), what a default install runs. A network no file
measured, or a column its run left out, is "not measured". Prints a Markdown table, then where each network's
numbers came from.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

PLAIN = "nnUNetTrainer"
NETWORKS = {"nnUNetTrainerSegMambaV2": "SegMamba-V2", "nnUNetTrainerSegMamba": "SegMamba",
            "nnUNetTrainerMambaClinix": "MambaClinix"}
STEP, PEAK, VOLUME = "compiled step, Triton", "peak memory of that step", "volume, nnUNetv2_predict's sliding window"
TARGETS = {STEP: (1.4, 1.6, 2.0), PEAK: (1.5, 1.6, 2.0), VOLUME: (1.5, 1.5, 1.5)}
"""Issue 31: at most this many times PlainConvUNet's, per network in NETWORKS' order."""


def _trainer(row: dict) -> tuple[str, str | None]:
    """A row's trainer and scan backend label: "nnUNetTrainerSegMamba [cuda]" -> ("nnUNetTrainerSegMamba", "cuda")."""
    name, _, label = row["trainer"].partition(" [")
    return name, label.rstrip("]") or None


def run_ratios(run: dict) -> dict[str, dict[str, float | None]]:
    """{trainer: {target: ratio to the run's PlainConvUNet, or None}} for the networks of NETWORKS in one run."""
    plain = next((row for row in run["results"] if row["trainer"] == PLAIN), None)
    if plain is None:
        return {}

    def ratio(value: float | None, reference: float | None) -> float | None:
        return None if value is None or not reference else value / reference

    plain_compiled = plain.get("compiled") or {}
    ratios: dict[str, dict[str, float | None]] = {}
    for row in run["results"]:
        name, backend = _trainer(row)
        if name not in NETWORKS:
            continue
        cells = ratios.setdefault(name, dict.fromkeys(TARGETS))
        compiled = row.get("compiled")
        if compiled:
            cells[STEP] = ratio(compiled.get("step_ms"), plain_compiled.get("step_ms"))
            cells[PEAK] = ratio(compiled.get("peak_gib"), plain_compiled.get("peak_gib"))
        if backend in (None, "triton"):
            cells[VOLUME] = ratio(row.get("volume_s"), plain.get("volume_s"))
    return ratios


def targets_table(runs: dict[str, dict]) -> str:
    """The Markdown table of TARGETS against the runs ({file name: benchmark JSON}); a later file's measured cell
    replaces an earlier one's."""
    cells: dict[str, dict[str, float]] = {name: {} for name in NETWORKS}
    sources: dict[str, list[str]] = {name: [] for name in NETWORKS}
    for source, run in runs.items():
        for name, ratios in run_ratios(run).items():
            measured = {target: value for target, value in ratios.items() if value is not None}
            cells[name].update(measured)
            if measured:
                sources[name].append(f"{source} ({run.get('gpu') or run.get('device', '?')})")
    lines = ["| target (x PlainConvUNet of the same run) | " + " | ".join(NETWORKS.values()) + " |",
             "|---" * (len(NETWORKS) + 1) + "|"]
    for target, limits in TARGETS.items():
        row = []
        for name, limit in zip(NETWORKS, limits):
            value = cells[name].get(target)
            row.append(f"not measured (<= {limit})" if value is None
                       else f"{value:.2f}x (<= {limit}), {'met' if value <= limit else 'missed'}")
        lines.append(f"| {target} | " + " | ".join(row) + " |")
    lines.append("")
    lines += [f"{NETWORKS[name]}: {', '.join(found) or 'in none of the files'}" for name, found in sources.items()]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="JSON files of `nnunet-segmamba benchmark -o`")
    args = parser.parse_args()
    runs = {}
    for path in args.runs:
        try:
            runs[str(path)] = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            parser.exit(2, f"speed_targets: cannot read {path}: {error}\n")
    print(targets_table(runs))


if __name__ == "__main__":
    main()
