#!/usr/bin/env python3
"""GPU experiment (not run by CI): the triton backend's token orders read in place (`triton_orders`) against
gathering copies, side by side in one run.

  benchmarks/orders_variants.py layer [eager]   Mamba layer fwd+bwd at a 128^3 plan's stages, eager [and compiled]
  benchmarks/orders_variants.py network [TRAINER ...] [--variants V ...] [--preset P]
                                               compiled training steps of whole networks, one row per variant

Variants of the triton backend: in-place (the kernels of `triton_orders`; shipped eager, here also compiled),
gather (copies + ATen conv1d, as before the in-place kernels), gather-shifted (copies + the conv1d as shifted
multiply-adds, which inductor fuses: shipped compiled).
"""

import argparse
import dataclasses
import statistics
import sys
import time

import torch

from nnunet_segmamba.mamba import Mamba, backends, plane_orders, raster_order, tom_orders

LAYERS = [(128, (32, 32, 32), "plane"), (128, (32, 32, 32), "tom"), (256, (16, 16, 16), "plane"),
          (320, (8, 8, 8), "plane")]
"""(d_model, token grid, orders) at a 128^3 plan's deep stages; SegMamba's ToM at its first Mamba stage (32^3);
each plane row also with one order."""
ORDERS = {"plane": plane_orders(3), "tom": tom_orders(3), "one": (raster_order(3),)}


@dataclasses.dataclass(frozen=True)
class InPlaceAlways(backends.ScanOps):
    """The triton backend with its in-place order kernels also under torch.compile (shipped: eager only)."""

    def conv_in_orders(self, x, grid, orders, weight, bias):
        return self.ordered_conv1d_silu(x, grid, orders, weight, bias)

    def sum_orders(self, y, grid, orders):
        return self.sum_over_orders(y, grid, orders)


def variants(device):
    shipped, reason = backends.GPU_OPS["triton"](device.index or 0)
    assert shipped is not None, reason
    gather = dataclasses.replace(shipped, ordered_conv1d_silu=None, sum_over_orders=None,
                                 conv1d_silu=backends.conv1d_silu_torch)
    in_place = InPlaceAlways(**vars(shipped))
    return {"in-place": in_place, "gather": gather,
            "gather-shifted": dataclasses.replace(gather, conv1d_silu=backends.conv1d_silu_shifted)}


def use(ops):
    """Every Mamba layer with backend 'triton' (or auto under compile) runs `ops`."""
    backends.GPU_OPS["triton"] = lambda index: (ops, "")
    backends._CHOSEN.clear()


def median_ms(fn, repeats=20, warmup=5):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        begin = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(1000 * (time.perf_counter() - begin))
    return statistics.median(times)


def layer(modes):
    device = torch.device("cuda")
    ops = variants(device)
    cuda_ops, _ = backends.GPU_OPS["cuda"](0)
    rows = []
    for d_model, grid, kind in LAYERS:
        for orders_name in (kind, "one") if kind == "plane" else (kind,):
            orders = ORDERS[orders_name]
            torch.manual_seed(0)
            x = torch.randn(2, grid[0] * grid[1] * grid[2], d_model, device=device, requires_grad=True)
            base = Mamba(d_model, orders=orders).to(device)
            runs = [("cuda", "eager", cuda_ops)] if cuda_ops is not None else []
            runs += [(variant, "eager", o) for variant, o in ops.items()]
            if orders_name != "one" and "compiled" in modes:
                runs += [(variant, "compiled", o) for variant, o in ops.items()]
            for variant, mode, o in runs:
                use(o)
                mamba = Mamba(d_model, orders=orders, backend="cuda" if variant == "cuda" else "triton").to(device)
                mamba.load_state_dict(base.state_dict())
                fn = torch.compile(mamba) if mode == "compiled" else mamba

                def step():
                    with torch.autocast("cuda", dtype=torch.bfloat16):
                        out = fn(x, grid)
                    out.float().square().mean().backward()
                torch._dynamo.reset()
                began = time.perf_counter()
                step()
                first = time.perf_counter() - began
                ms = median_ms(step)
                torch.cuda.reset_peak_memory_stats()
                step()
                peak = torch.cuda.max_memory_allocated() / 2**20
                rows.append((d_model, "x".join(map(str, grid)), orders_name, variant, mode, ms, peak, first))
                print(*rows[-1], flush=True)
    print("\nMamba layer fwd+bwd, bf16 autocast, batch 2,", torch.cuda.get_device_name())
    print(f"{'d_model':>7} {'tokens':>8} {'orders':>6} {'variant':>15} {'mode':>8} {'ms':>8} {'peak MiB':>9} "
          f"{'vs cuda':>8} {'1st s':>6}")
    reference = {}
    for d_model, tokens, orders_name, variant, mode, ms, peak, first in rows:
        if variant == "cuda":
            reference[(d_model, tokens, orders_name)] = ms
        ratio = reference.get((d_model, tokens, orders_name), float("nan")) / ms
        print(f"{d_model:>7} {tokens:>8} {orders_name:>6} {variant:>15} {mode:>8} {ms:8.2f} {peak:9.0f} "
              f"{ratio:7.2f}x {first:6.1f}")


def network(trainers, names, preset="3d_128"):
    """Each trainer's network at `preset` (nnU-Net's default batch, 4 -> 4 channels, fp16 autocast), its training
    step compiled on the triton backend once per variant of `names` (in this order, a name may repeat): step ms,
    peak GiB, compile s and the CUDA kernels' ms per step by category (`benchmark --profile`'s)."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunet_segmamba.tools.benchmark.compiled import compiled_training
    from nnunet_segmamba.tools.benchmark.configurations import preset_plans
    from nnunet_segmamba.tools.benchmark.timing import cudnn_as_nnunet, random_batch, training_step
    from nnunet_segmamba.tools.environment import find_trainer

    device = torch.device("cuda")
    cudnn_as_nnunet()
    ops = variants(device)
    manager = PlansManager(preset_plans(preset, 4))
    configuration = manager.get_configuration(preset)
    print(f"Compiled training steps, {preset}, batch {configuration.batch_size}, fp16 autocast, "
          f"{torch.cuda.get_device_name(device)}; kernels: CUDA kernels' ms per step by category")
    for trainer in trainers:
        net = find_trainer(trainer).build_network_architecture(manager, configuration, 4, 4, True).to(device)
        x, targets = random_batch(net, configuration.batch_size, 4, configuration.patch_size, 4, device)
        for name in names:
            use(ops[name])
            result = compiled_training(lambda n: training_step(n, x, targets, device, torch.float16), net, device,
                                       warmup=3, repeats=10, backend="triton", profile=True)
            if "error" in result:
                print(f"{trainer} {name}: {result['error']}", flush=True)
                continue
            profile = result["profile"]
            categories = " ".join(f"{category} {ms:.1f}" for category, ms in sorted(
                profile["categories"].items(), key=lambda item: -item[1]))
            print(f"{trainer} {name}: step {result['step_ms']:.1f} ms, peak {result['peak_gib']:.2f} GiB, compile "
                  f"{result['compile_s']:.0f} s, graph breaks {result['graph_breaks']}; kernels "
                  f"{profile['total_ms']:.1f} ms: {categories}", flush=True)
        del net
        torch.cuda.empty_cache()


if __name__ == "__main__":
    if sys.argv[1:2] == ["network"]:
        parser = argparse.ArgumentParser(prog="orders_variants.py network")
        parser.add_argument("trainers", nargs="*", default=["nnUNetTrainerSegMamba"])
        parser.add_argument("--variants", nargs="+", default=["gather-shifted", "in-place", "gather-shifted"],
                            choices=("in-place", "gather", "gather-shifted"))
        parser.add_argument("--preset", default="3d_128")
        args = parser.parse_args(sys.argv[2:])
        network(args.trainers, args.variants, args.preset)
    else:
        assert sys.argv[1] == "layer", __doc__
        layer(sys.argv[2:] or ["eager", "compiled"])
