"""GPU memory of a training step of our networks, as a function of the plans: the planners' estimate.

    peak_GiB(batch) = compile_factor * (gamma + beta * parameters + alpha * batch * activations)

`activations` is nnU-Net's own size measure for a topology: the feature-map elements of a PlainConvUNet with
the same plans (`compute_conv_feature_map_size`), per sample; `parameters` counts the network itself (weights,
gradients and SGD momentum are `beta` bytes each); `alpha` and `gamma` are fitted per network from measured
eager peaks (`nnunet-segmamba benchmark`, `train_peak_gib`), kept in calibration.json with how they were
measured. `compile_factor` is the network's compiled / eager peak at one measured point (`benchmark --compile`),
at least 1: nnUNetv2_train compiles by default on CUDA, and a plan must fit compiled and eager alike.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

CALIBRATION_FILE = Path(__file__).with_name("calibration.json")
BYTES_PER_PARAMETER = 16
"""fp32 weight, gradient and momentum (12 bytes) plus the autocast copy of the weight and allocator slack."""


@dataclass(frozen=True)
class MemoryModel:
    """Peak memory (GiB) of a training step:
    `compile_factor * (gamma + beta * parameters + alpha * batch * activations)`."""

    alpha: float  # GiB per 1e9 activation elements per sample
    gamma: float  # GiB
    beta: float = BYTES_PER_PARAMETER / 2**30  # GiB per parameter
    compile_factor: float = 1.0  # compiled / eager peak where measured, at least 1

    def __str__(self) -> str:
        return (f"{self.compile_factor:.2f} x ({self.gamma:.2f} GiB + {self.beta * 2**30:.0f} B per parameter + "
                f"{self.alpha:.2f} GiB per 1e9 activations x batch)")

    def peak_gib(self, batch_size: int, activations: float, parameters: float) -> float:
        return self.compile_factor * (self.gamma + self.beta * parameters + self.alpha * batch_size * activations / 1e9)

    def max_batch_size(self, target_gib: float, activations: float, parameters: float) -> int:
        """The largest batch whose estimate stays within `target_gib` (0 if not even one sample fits)."""
        room = target_gib / self.compile_factor - self.gamma - self.beta * parameters
        return max(0, math.floor(room / (self.alpha * activations / 1e9)))


def fit(points: Sequence[dict[str, float]], beta: float = BYTES_PER_PARAMETER / 2**30,
        default_gamma: float = 0.5) -> MemoryModel:
    """Least-squares `alpha`, `gamma` from measured points {batch_size, activations, parameters, peak_gib};
    `gamma` stays `default_gamma` if the points do not vary in batch * activations. A negative `gamma` is
    clamped to 0 with the free fit's `alpha`, which over-estimates small peaks: the safe side for planning."""
    if not points:
        raise ValueError("fit needs at least one measured point")
    load = np.array([p["batch_size"] * p["activations"] / 1e9 for p in points])
    rest = np.array([p["peak_gib"] - beta * p["parameters"] for p in points])
    if np.ptp(load) == 0:
        return MemoryModel(alpha=float(np.mean((rest - default_gamma) / load)), gamma=default_gamma, beta=beta)
    alpha, gamma = np.linalg.lstsq(np.stack([load, np.ones_like(load)], 1), rest, rcond=None)[0]
    return MemoryModel(alpha=float(alpha), gamma=float(max(gamma, 0.0)), beta=beta)


def load_calibration(path: Path = CALIBRATION_FILE) -> dict[str, MemoryModel]:
    """The fitted model of each network in the calibration file (keyed by network class name)."""
    return models_of(json.loads(path.read_text()))


def models_of(calibration: dict[str, Any]) -> dict[str, MemoryModel]:
    """The model of each network of a calibration: fitted to its points, with its compile factor where a
    compiled peak was measured."""
    models = {}
    for name, entry in calibration["networks"].items():
        compiled = entry.get("compiled")
        factor = max(1.0, compiled["compiled_peak_gib"] / compiled["eager_peak_gib"]) if compiled else 1.0
        models[name] = dataclasses.replace(fit(entry["points"]), compile_factor=factor)
    return models


@functools.lru_cache(maxsize=256)
def _sizes(network_class_name: str, arch_kwargs_json: str, requires_import: tuple[str, ...],
           patch_size: tuple[int, ...], input_channels: int, num_classes: int) -> tuple[float, float]:
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    arch_kwargs = json.loads(arch_kwargs_json)
    plain = get_network_from_plans("dynamic_network_architectures.architectures.unet.PlainConvUNet", arch_kwargs,
                                   requires_import, input_channels, num_classes, allow_init=False)
    activations = float(plain.compute_conv_feature_map_size(list(patch_size)))
    with torch.device("meta"):
        network = get_network_from_plans(network_class_name, arch_kwargs, requires_import, input_channels,
                                         num_classes, allow_init=False)
    return activations, float(sum(p.numel() for p in network.parameters()))


def network_sizes(network_class_name: str, arch_kwargs: dict[str, Any], requires_import: Sequence[str],
                  patch_size: Sequence[int], input_channels: int, num_classes: int) -> tuple[float, float]:
    """(activations per sample, parameters) of `network_class_name` built from these plans entries (no weights
    are allocated: the network is built on the meta device)."""
    return _sizes(network_class_name, json.dumps(arch_kwargs, sort_keys=True, default=str), tuple(requires_import),
                  tuple(int(s) for s in patch_size), int(input_channels), int(num_classes))


def points_from_benchmark(payload: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Calibration points {network class: point} from one `nnunet-segmamba benchmark -o` file (GPU runs only)."""
    if payload.get("gpu") is None:
        raise ValueError("a benchmark run on the CPU has no peak memory; calibrate from a GPU run")
    architecture = payload["architecture"]
    points = {}
    for result in payload["results"]:
        activations, parameters = network_sizes(result["network"], architecture["arch_kwargs"],
                                                architecture["_kw_requires_import"], payload["patch_size"],
                                                payload["in_channels"], payload["num_classes"])
        points[result["network"]] = {"patch_size": payload["patch_size"], "batch_size": payload["batch_size"],
                                     "activations": activations, "parameters": parameters,
                                     "peak_gib": result["train_peak_gib"]}
    return points


def compiled_peaks(payload: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """{network class: eager and compiled peak at the run's patch and batch} from one `nnunet-segmamba benchmark
    --compile -o` file (GPU runs only)."""
    measured = [r for r in payload["results"] if "peak_gib" in (r.get("compiled") or {})]  # not failed compiles
    if payload.get("gpu") is None or not measured:
        raise ValueError("compile factors need a GPU run of `nnunet-segmamba benchmark --compile`")
    return {r["network"]: {"patch_size": payload["patch_size"], "batch_size": payload["batch_size"],
                           "eager_peak_gib": r["train_peak_gib"], "compiled_peak_gib": r["compiled"]["peak_gib"]}
            for r in measured}


def main(argv: Sequence[str] | None = None) -> int:
    """Calibrate from benchmark files: python -m nnunet_segmamba.plans.memory --how TEXT BENCH_JSON... replaces the
    points; with --compiled, files of `benchmark --compile` set the compile factors and keep the points"""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__.split(": ")[0])
    parser.add_argument("benchmarks", nargs="+", type=Path)
    parser.add_argument("--how", required=True, help="the command and machine that produced the files")
    parser.add_argument("--compiled", action="store_true",
                        help="the files come from `benchmark --compile`: set the compile factors, keep the points")
    parser.add_argument("-o", "--output", type=Path, default=CALIBRATION_FILE)
    args = parser.parse_args(argv)
    calibration = json.loads(args.output.read_text()) if args.output.exists() else {"networks": {}}
    payloads = [json.loads(path.read_text()) for path in args.benchmarks]
    if args.compiled:
        for payload in payloads:
            for network, peaks in compiled_peaks(payload).items():
                if network not in calibration["networks"]:
                    raise ValueError(f"{network} has no calibration points in {args.output}: calibrate them first")
                calibration["networks"][network]["compiled"] = {"how": args.how, "machine": payload["gpu"], **peaks}
    else:
        networks: dict[str, dict[str, Any]] = {}
        for payload in payloads:
            for network, point in points_from_benchmark(payload).items():
                networks.setdefault(network, {"points": []})["points"].append(point)
        for network, entry in networks.items():  # compile factors are ratios: they outlive new points
            if "compiled" in calibration["networks"].get(network, {}):
                entry["compiled"] = calibration["networks"][network]["compiled"]
        calibration = {"how": args.how, "machine": payloads[-1]["gpu"], "networks": networks}
    for network, model in models_of(calibration).items():
        print(f"{network}: {model}")
    args.output.write_text(json.dumps(calibration, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
