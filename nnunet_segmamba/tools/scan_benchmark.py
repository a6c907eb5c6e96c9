"""`nnunet-segmamba benchmark-scan`: the scan backends against each other, errors and times.

- ``--reference``: the exact PyTorch scan against the token-by-token reference (forward + backward of
  the scan alone), e.g. L = 4096 tokens of a d_model = 64 layer (128 channels, N = 16).
- default: a Mamba layer forward + backward with each available backend at the token counts of a
  128^3 plan's Mamba stages; relative errors of the output and of the input and parameter gradients
  of every backend against ``torch`` under each ``--dtypes`` autocast, median times eager and (``--compile``)
  compiled, each against mamba-ssm's ``cuda`` kernel. Then the scan alone per GPU backend: time and achieved
  memory bandwidth against the GPU's.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

from nnunet_segmamba.tools.benchmark.network import AMP
from nnunet_segmamba.tools.errors import USAGE, report

STAGES = [(128, (32, 32, 32)), (256, (16, 16, 16)), (320, (8, 8, 8))]
"""(d_model, token grid) of the deep stages of nnU-Net's 128^3 plan (features 32 ... 320)."""


def _median_ms(fn, device, warmup: int, repeats: int) -> float:
    import torch

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        begin = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(1000 * (time.perf_counter() - begin))
    return statistics.median(times)


def _relative(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def reference_comparison(length: int, channels: int, d_state: int, repeats: int) -> None:
    """The torch scan against the token-by-token reference on the CPU."""
    import torch

    from nnunet_segmamba.mamba.reference import selective_scan_reference
    from nnunet_segmamba.mamba.scan import selective_scan

    g = torch.Generator().manual_seed(0)
    inputs = [torch.randn(1, channels, length, generator=g), torch.rand(1, channels, length, generator=g) * 0.1,
              -torch.rand(channels, d_state, generator=g) - 0.5, torch.randn(1, d_state, length, generator=g),
              torch.randn(1, d_state, length, generator=g), torch.randn(channels, generator=g),
              torch.randn(1, channels, length, generator=g)]
    rows = []
    for name, fn in (("reference (token by token)", selective_scan_reference), ("torch (chunked)", selective_scan)):
        leaves = [t.clone().requires_grad_() for t in inputs]

        def step():
            out = fn(*leaves[:6], z=leaves[6])
            out.square().mean().backward()
        rows.append((name, _median_ms(step, torch.device("cpu"), 1, repeats)))
    print(f"selective scan, forward + backward, L={length}, {channels} channels, N={d_state}, CPU "
          f"({torch.get_num_threads()} threads)")
    for name, ms in rows:
        print(f"  {name:<28} {ms:10.1f} ms")
    print(f"  speed-up: {rows[0][1] / rows[1][1]:.1f}x")


def gpu_scans(device) -> dict:
    """{backend name: selective scan} of the GPU backends that run on `device` (the others are reported)."""
    from nnunet_segmamba.mamba.backends import GPU_OPS

    scans = {}
    for name, find in GPU_OPS.items():
        ops, reason = find(device.index)
        if ops is None:
            print(f"{name} backend unavailable: {reason}")
        else:
            scans[name] = ops.selective_scan
    return scans


def layer_step(layer, x, grid, dtype):
    """One forward + backward of `layer` on a fresh leaf copy of `x` under autocast `dtype` (fp32: none):
    (output, input gradient). The loss is a sum, not a mean: a mean's fp16 gradients would underflow."""
    import torch

    leaf = x.clone().requires_grad_()
    with torch.autocast(x.device.type, dtype=dtype, enabled=dtype != torch.float32):
        out = layer(leaf, grid)
    out.float().square().sum().backward()
    return out.detach(), leaf.grad


def backend_comparison(backends: list[str], orders_per_layer: list[int], batch: int, warmup: int, repeats: int,
                       dtypes: tuple[str, ...] = ("fp32", "bf16"), compile: bool = False, device=None,
                       stages=STAGES) -> list[dict]:
    """Each backend's Mamba layer (mamba-ssm's `cuda`, our `triton`) against the torch backend, same weights and
    inputs, at each stage of `stages` and autocast dtype of `dtypes`: relative errors of output, input gradient and
    weight gradients, median forward + backward ms, eager and (`compile`) under torch.compile, and each time's ratio
    to the `cuda` backend's. Prints each row as measured; returns the rows."""
    import torch

    from nnunet_segmamba.mamba import Mamba, plane_orders, raster_order

    device = device or torch.device("cuda")
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"Mamba layer forward + backward, batch {batch}, {name}; errors relative to the torch backend; "
          f"x cuda = ms / the cuda backend's ms{'; compiled: torch.compile of the layer' if compile else ''}")
    header = (f"{'d_model':>7} {'tokens':>8} {'orders':>6} {'dtype':>5} {'backend':>7} | "
              f"{'err out':>8} {'err dx':>8} {'err dW max':>10} | {'ms':>8} {'x cuda':>6}")
    header += f" | {'compiled ms':>11} {'x cuda':>6}" if compile else ""
    print(header + "\n" + "-" * len(header), flush=True)
    rows = []
    for d_model, grid in stages:
        for n_orders in orders_per_layer:
            orders = plane_orders(3) if n_orders == 3 else (raster_order(3),)
            torch.manual_seed(0)
            layers = {"torch": Mamba(d_model, orders=orders, backend="torch").to(device)}
            for backend in backends:
                layers[backend] = copy.deepcopy(layers["torch"])
                layers[backend].backend = backend
            torch._dynamo.reset()  # each stage's layers compiled afresh, for their static shapes
            compiled = {b: torch.compile(layers[b], dynamic=False) for b in backends} if compile else {}
            x = torch.randn(batch, grid[0] * grid[1] * grid[2], d_model, device=device)
            for dtype_name in dtypes:
                dtype = getattr(torch, AMP[dtype_name] or "float32")  # fp32: no autocast
                measured = {}
                for backend, layer in layers.items():
                    layer.zero_grad(set_to_none=True)
                    out, dx = layer_step(layer, x, grid, dtype)
                    dw = {n: p.grad.clone() for n, p in layer.named_parameters()}
                    ms = _median_ms(lambda: layer_step(layer, x, grid, dtype), device, warmup, repeats)
                    compiled_ms = (_compiled_ms(lambda: layer_step(compiled[backend], x, grid, dtype), device,
                                                warmup, repeats) if backend in compiled else None)
                    measured[backend] = (out, dx, dw, ms, compiled_ms)
                out_t, dx_t, dw_t = measured["torch"][:3]
                cuda = measured.get("cuda")
                for backend, (out, dx, dw, ms, compiled_ms) in measured.items():
                    row = {"d_model": d_model, "grid": grid, "orders": n_orders, "dtype": dtype_name,
                           "backend": backend, "err_out": _relative(out, out_t), "err_dx": _relative(dx, dx_t),
                           "err_dw": max(_relative(dw[n], dw_t[n]) for n in dw_t), "ms": ms,
                           "compiled_ms": compiled_ms}
                    rows.append(row)
                    line = (f"{d_model:>7} {'x'.join(map(str, grid)):>8} {n_orders:>6} {dtype_name:>5} {backend:>7} | "
                            f"{row['err_out']:8.1e} {row['err_dx']:8.1e} {row['err_dw']:10.1e} | {ms:8.2f} "
                            f"{_ratio(ms, cuda and cuda[3])}")
                    if compile:
                        line += (f" | {compiled_ms:11.2f} {_ratio(compiled_ms, cuda and cuda[4])}"
                                 if isinstance(compiled_ms, float) else f" | {compiled_ms or '-':>11} {'-':>6}")
                    print(line, flush=True)
    return rows


def _compiled_ms(step, device, warmup: int, repeats: int) -> float | str:
    """Median ms of a compiled `step` (its first call compiles), or the name of the error compiling it raised."""
    try:
        return _median_ms(step, device, warmup + 1, repeats)
    except Exception as error:  # dynamo's and inductor's errors are many; the row says which
        return f"error: {type(error).__name__}"


def _ratio(ms: float, cuda_ms: float | str | None) -> str:
    return f"{ms / cuda_ms:5.2f}x" if isinstance(cuda_ms, float) else f"{'-':>6}"


def scan_bytes(batch: int, dim: int, groups: int, d_state: int, length: int, element_size: int) -> int:
    """The least memory traffic of a selective scan's forward + backward: the forward reads u, delta, z (batch,
    dim, L), B and C (batch, groups, N, L) and writes the output; the backward reads them and d(out) and writes
    their five gradients. Parameters (A, D, bias) and saved states are left out: a lower bound."""
    streams = 3 * dim + 2 * groups * d_state  # u, delta, z, B, C
    forward = (streams + dim) * batch * length
    backward = (streams + dim + streams) * batch * length
    return (forward + backward) * element_size


def peak_bandwidth_gbs(device) -> float | None:
    """The GPU's memory bandwidth from its clock and bus width (double data rate), GB/s; None if unknown."""
    import torch

    properties = torch.cuda.get_device_properties(device)
    clock_khz, bus_bits = getattr(properties, "memory_clock_rate", 0), getattr(properties, "memory_bus_width", 0)
    return 2 * clock_khz * 1e3 * bus_bits / 8 / 1e9 if clock_khz and bus_bits else None


def scan_inputs(d_model: int, grid, batch: int, dtype, device, d_state: int = 16) -> tuple[tuple, object]:
    """A tri-orientated layer's scan at one stage (3 orders as groups, expand 2): the arguments of
    `selective_scan` (u, delta, A, B, C, D, z, delta_bias, delta_softplus), leaves in `dtype` (A, D, bias fp32),
    and a gradient of the output."""
    import torch

    length, groups = grid[0] * grid[1] * grid[2], 3
    dim = 2 * d_model * groups
    g = torch.Generator(device=device).manual_seed(0)

    def tensor(*shape, scale=1.0):
        return (scale * torch.randn(*shape, device=device, generator=g)).to(dtype).requires_grad_()
    u, delta, z = tensor(batch, dim, length), tensor(batch, dim, length, scale=0.1), tensor(batch, dim, length)
    B, C = tensor(batch, groups, d_state, length), tensor(batch, groups, d_state, length)
    A = (-torch.rand(dim, d_state, device=device, generator=g) - 0.5).requires_grad_()
    D = torch.ones(dim, device=device, requires_grad=True)
    bias = torch.zeros(dim, device=device, requires_grad=True)
    grad = torch.randn(batch, dim, length, device=device, generator=g).to(dtype)
    return (u, delta, A, B, C, D, z, bias, True), grad


def scan_step(scan, arguments: tuple, grad) -> None:
    """One forward + backward of `scan` on `scan_inputs`' arguments (gradients of all leaves, discarded)."""
    import torch

    out = scan(*arguments)
    torch.autograd.grad(out, [t for t in arguments[:8] if t is not None], grad)


def scan_bandwidth(backends: dict, device, batch: int, warmup: int, repeats: int,
                   stages=STAGES, d_state: int = 16, no_grad_forward: bool = True) -> list[dict]:
    """The selective scan alone, forward + backward, at each stage's token count with the channels of a
    tri-orientated layer (`scan_inputs`): time and achieved bandwidth (`scan_bytes` / time) of each backend in
    `backends` ({name: selective_scan}), fp32 and bf16 inputs; with `no_grad_forward` also the forward alone
    without grad (inference)."""
    import torch

    rows = []
    for d_model, grid in stages:
        for dtype in (torch.float32, torch.bfloat16):
            arguments, grad = scan_inputs(d_model, grid, batch, dtype, device, d_state)
            u, B = arguments[0], arguments[3]
            _, dim, length = u.shape
            for name, scan in backends.items():
                def step():
                    scan_step(scan, arguments, grad)

                @torch.no_grad()
                def forward():
                    scan(*arguments)
                ms = _median_ms(step, device, warmup, repeats)
                gbs = scan_bytes(batch, dim, B.shape[1], d_state, length, u.element_size()) / ms / 1e6
                rows.append({"d_model": d_model, "grid": grid, "dim": dim, "dtype": str(dtype)[6:], "backend": name,
                             "ms": ms, "gbs": gbs, "extra_mib": _extra_memory_mib(step, device),
                             "forward_ms": _median_ms(forward, device, warmup, repeats) if no_grad_forward else None})
    return rows


def _extra_memory_mib(fn, device) -> float | None:
    """Peak memory fn() allocates beyond what was allocated before it, in MiB (None off CUDA)."""
    import torch

    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def print_bandwidth(rows: list[dict], peak_gbs: float | None, title: str) -> None:
    peak = f"memory bandwidth {peak_gbs:.0f} GB/s (clock x bus width)" if peak_gbs else "memory bandwidth unknown"
    print(f"\n{title}; bytes = least traffic of the scan's inputs, outputs and gradients; {peak}; extra MiB = "
          f"peak memory of one forward + backward beyond its inputs; no-grad fwd = the forward alone, as in inference")
    header = (f"{'d_model':>7} {'tokens':>8} {'channels':>8} {'dtype':>8} {'backend':>7} | "
              f"{'ms':>8} {'GB/s':>8} {'of peak':>7} {'extra MiB':>9} {'no-grad fwd ms':>14}")
    print(header + "\n" + "-" * len(header))
    for r in rows:
        share = f"{100 * r['gbs'] / peak_gbs:6.1f}%" if peak_gbs else f"{'-':>7}"
        extra = f"{r['extra_mib']:9.0f}" if r["extra_mib"] is not None else f"{'-':>9}"
        forward = f"{r['forward_ms']:14.2f}" if r["forward_ms"] is not None else f"{'-':>14}"
        print(f"{r['d_model']:>7} {'x'.join(map(str, r['grid'])):>8} {r['dim']:>8} {r['dtype']:>8} {r['backend']:>7} | "
              f"{r['ms']:8.2f} {r['gbs']:8.1f} {share} {extra} {forward}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__.splitlines()[0].split(": ", 1)[1]
    parser.add_argument("--reference", action="store_true", help="torch scan vs token-by-token reference (CPU)")
    parser.add_argument("--length", type=int, default=4096, help="tokens for --reference (default 4096)")
    parser.add_argument("--channels", type=int, default=128, help="channels for --reference (d_inner; default 128)")
    parser.add_argument("--batch", type=int, default=2, help="batch size for the backend comparison")
    parser.add_argument("--orders", type=int, nargs="+", default=[1, 3], choices=(1, 3))
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=list(AMP),
                        help="autocast dtypes of the layer comparison (fp32: none; default fp32 bf16)")
    parser.add_argument("--compile", action="store_true",
                        help="also time each GPU backend's layer under torch.compile")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)


def main(args: argparse.Namespace) -> int:
    import torch

    if args.reference:
        reference_comparison(args.length, args.channels, 16, max(1, args.repeats // 5))
        return 0
    if not torch.cuda.is_available():
        return report("benchmark-scan", "the backend comparison needs a CUDA GPU; on the CPU use --reference", USAGE)
    device = torch.device("cuda", torch.cuda.current_device())
    kernels = gpu_scans(device)
    backend_comparison(list(kernels), args.orders, args.batch, args.warmup, args.repeats, tuple(args.dtypes),
                       args.compile)
    rows = scan_bandwidth(kernels, device, args.batch, args.warmup, args.repeats)
    print_bandwidth(rows, peak_bandwidth_gbs(device), f"Selective scan alone (tri-orientated layer's channels), "
                    f"forward + backward, batch {args.batch}, {torch.cuda.get_device_name(device)}")
    return 0
