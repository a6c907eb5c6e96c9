"""Where a network's training memory goes, on any device: the bytes autograd saves for the backward, per module.

A training step's peak is mostly the tensors the forward saves for the backward. This counts them (each storage
once, where it was first saved) with `torch.autograd.graph.saved_tensors_hooks` and charges them to the innermost
module running at the time, then sums per module class and stage. It runs on the CPU (bf16 autocast: the byte
sizes of fp16) as well as on a GPU, so a memory change can be checked without one.

    python3 benchmarks/saved_activations.py [-tr nnUNetTrainerMambaClinix] [--patch 128 128 128] [--batch 2]
"""

from __future__ import annotations

import argparse
import os
from collections import defaultdict

import torch
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
from torch import nn

from nnunet_segmamba.tools.benchmark.configurations import preset_plans
from nnunet_segmamba.tools.environment import find_trainer, trainers_folder


def saved_bytes(network: nn.Module, x: torch.Tensor, dtype: torch.dtype) -> dict[str, int]:
    """Bytes saved for the backward by one forward of `network` on `x` under autocast, per module name."""
    stack, charged, seen = [""], defaultdict(int), set()

    def enter(name: str):
        return lambda *_: stack.append(name)

    def leave(*_):
        stack.pop()

    handles = []
    for name, module in network.named_modules():
        if name:
            handles += [module.register_forward_pre_hook(enter(name)), module.register_forward_hook(leave)]

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        key = (storage.data_ptr(), storage.nbytes())
        if key not in seen and not isinstance(tensor, nn.Parameter):
            seen.add(key)
            charged[stack[-1]] += storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast(x.device.type, dtype=dtype):
        network(x)
    for handle in handles:
        handle.remove()
    return dict(charged)


def table(charged: dict[str, int], network: nn.Module, depth: int) -> list[tuple[str, str, float]]:
    """Per module path cut at `depth` dots: its class and MiB, largest first."""
    modules = dict(network.named_modules())
    rows = defaultdict(float)
    for name, nbytes in charged.items():
        rows[".".join(name.split(".")[:depth])] += nbytes / 2**20
    return sorted(((name, type(modules[name]).__name__ if name in modules else "", mib)
                   for name, mib in rows.items()), key=lambda row: -row[2])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-tr", "--trainer", default="nnUNetTrainerMambaClinix")
    parser.add_argument("--preset", default="3d_128", help="a plans preset of `nnunet-segmamba benchmark`")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--depth", type=int, default=4, help="module path depth of the table's rows")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    os.environ.setdefault("nnUNet_extTrainer", trainers_folder())
    manager = PlansManager(preset_plans(args.preset, 4))
    configuration = manager.get_configuration(args.preset)
    network = find_trainer(args.trainer).build_network_architecture(manager, configuration, 4, 4, True)
    network = network.to(args.device)
    x = torch.randn(args.batch, 4, *configuration.patch_size, device=args.device)
    dtype = torch.float16 if args.device.startswith("cuda") else torch.bfloat16
    charged = saved_bytes(network, x, dtype)
    total = sum(charged.values()) / 2**20
    print(f"{args.trainer}, {args.preset} (patch {configuration.patch_size}), batch {args.batch}, {dtype}: "
          f"{total:.0f} MiB saved for the backward\n")
    print("| module | class | MiB | share |\n|---|---|---|---|")
    for name, kind, mib in table(charged, network, args.depth)[:25]:
        print(f"| {name or '(top)'} | {kind} | {mib:.0f} | {mib / total:.0%} |")


if __name__ == "__main__":
    main()
