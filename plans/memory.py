"""GPU memory of a training step of our networks, as a function of the plans: the planners' estimate.

    peak_GiB(batch) = gamma + beta * parameters + alpha * batch * activations

`activations` is nnU-Net's own size measure for a topology: the feature-map elements of a PlainConvUNet with
the same plans (`compute_conv_feature_map_size`), per sample; `parameters` counts the network itself (weights,
gradients and SGD momentum are `beta` bytes each); `alpha` and `gamma` are fitted per network from measured
peaks (`nnunet-segmamba benchmark`, `train_peak_gib`), kept in calibration.json with how they were measured.
"""

from __future__ import annotations

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
    """Peak memory (GiB) of a training step: `gamma + beta * parameters + alpha * batch * activations`."""

    alpha: float  # GiB per 1e9 activation elements per sample
    gamma: float  # GiB
    beta: float = BYTES_PER_PARAMETER / 2**30  # GiB per parameter

    def __str__(self) -> str:
        return (f"{self.gamma:.2f} GiB + {self.beta * 2**30:.0f} B per parameter + {self.alpha:.2f} GiB per 1e9 "
                f"activations x batch")

    def peak_gib(self, batch_size: int, activations: float, parameters: float) -> float:
        return self.gamma + self.beta * parameters + self.alpha * batch_size * activations / 1e9

    def max_batch_size(self, target_gib: float, activations: float, parameters: float) -> int:
        """The largest batch whose estimate stays within `target_gib` (0 if not even one sample fits)."""
        room = target_gib - self.gamma - self.beta * parameters
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
    data = json.loads(path.read_text())
    return {name: fit(entry["points"]) for name, entry in data["networks"].items()}


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


def main(argv: Sequence[str] | None = None) -> int:
    """Replace the calibration points with those of benchmark files: python -m nnunet_segmamba.plans.memory
    [--how TEXT] BENCH_JSON..."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__.split(": ")[0])
    parser.add_argument("benchmarks", nargs="+", type=Path)
    parser.add_argument("--how", required=True, help="the command and machine that produced the files")
    parser.add_argument("-o", "--output", type=Path, default=CALIBRATION_FILE)
    args = parser.parse_args(argv)
    networks: dict[str, dict[str, list]] = {}
    for path in args.benchmarks:
        payload = json.loads(path.read_text())
        for network, point in points_from_benchmark(payload).items():
            networks.setdefault(network, {"points": []})["points"].append(point)
        machine = payload["gpu"]
    for network, entry in networks.items():
        model = fit(entry["points"])
        print(f"{network}: alpha {model.alpha:.3f} GiB per 1e9 activations, gamma {model.gamma:.2f} GiB "
              f"({len(entry['points'])} points)")
    args.output.write_text(json.dumps({"how": args.how, "machine": machine, "networks": networks}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
