"""Which implementation runs a Mamba layer's causal conv1d and selective scan.

- ``cuda``: mamba-ssm's selective-scan kernel, and causal-conv1d's kernel when that package is there.
- ``torch``: the exact PyTorch scan of `scan.py` and ``F.conv1d``; any device.
- ``triton``: our Triton selective scan (`triton_scan.py`, no compile step) and our Triton kernels that read the
  token orders in place, with the conv1d on the way (`triton_orders.py`); CUDA only.

The choice, in order: the layer's ``backend`` argument, the environment variable
``NNUNET_SEGMAMBA_SCAN`` (``auto``, ``cuda``, ``triton`` or ``torch``), then ``auto``: for CUDA tensors the first
of AUTO_PREFERENCE whose kernels import and run on the GPU, else ``torch``. A forced ``cuda`` that cannot run
is an error; an automatic fall-back is a warning, once. mamba-ssm is imported on first use only: its
import fails on machines without CUDA. Under torch.compile our trainers take ``triton`` for ``auto``
(`backend_for_compile`): its kernels compile into the graph.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import warnings
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from nnunet_segmamba.mamba.orders import TokenOrder
from nnunet_segmamba.mamba.scan import selective_scan as torch_selective_scan

BACKEND_ENV = "NNUNET_SEGMAMBA_SCAN"
CHOICES = ("auto", "cuda", "triton", "torch")
CUDA_INSTALL_HINT = (
    "install the kernels for your torch/CUDA: `pip install --no-build-isolation mamba-ssm causal-conv1d` "
    "(needs nvcc; see README, 'GPU install'), or set NNUNET_SEGMAMBA_SCAN=torch to silence this"
)
logger = logging.getLogger("nnunet_segmamba")

KERNEL_ELEMENT_LIMIT = 2**31 - 1
"""mamba-ssm and causal-conv1d index with 32-bit integers: per call, (batch, dim, L) inputs and the scan's saved
state (batch, dim, ceil(L / 2048), 2 * d_state) must stay below this. Larger batches are split."""


@dataclass(frozen=True)
class ScanOps:
    """The two kernels of a Mamba layer and where they come from."""

    name: str
    description: str
    conv1d_silu: Callable[[Tensor, Tensor, Tensor | None], Tensor]
    """SiLU(causal depthwise conv1d): x (B, C, L), weight (C, 1, K), bias (C,) -> (B, C, L)."""
    selective_scan: Callable[..., Tensor]
    """mamba_ssm's ``selective_scan_fn`` contract (see `scan.selective_scan`)."""
    ordered_conv1d_silu: Callable[..., Tensor] | None = None
    """`conv_in_orders` without copies (`triton_orders.ordered_conv1d_silu`); None: gather, then conv1d_silu."""
    sum_over_orders: Callable[..., Tensor] | None = None
    """`sum_orders` without copies (`triton_orders.sum_over_orders`); None: the sum of `TokenOrder.scatter`s.
    Both run eager only: under torch.compile the copies fuse into inductor's kernels, which was as fast at 32^3
    tokens and faster below (H200, BENCHMARKS.md, "The Mamba layer: token orders in place vs copies": 4.1 vs 4.8 ms
    at 16^3, 3.5 vs 5.8 ms at 8^3)."""

    def conv_in_orders(self, x: Tensor, grid: Sequence[int], orders: Sequence[TokenOrder], weight: Tensor,
                       bias: Tensor | None) -> Tensor:
        """SiLU(conv1d_k(order_k(x))) for every order k: x (B, L, C) row-major over grid -> (B, K*C, L)."""
        if self.ordered_conv1d_silu is not None and not torch.compiler.is_compiling():
            return self.ordered_conv1d_silu(x, grid, orders, weight, bias)
        tokens = x.reshape(x.shape[0], *grid, x.shape[-1])
        sequences = [order.gather(tokens) for order in orders]
        u = sequences[0].contiguous() if len(sequences) == 1 else torch.cat(sequences, dim=1)
        return self.conv1d_silu(u, weight, bias)

    def sum_orders(self, y: Tensor, grid: Sequence[int], orders: Sequence[TokenOrder]) -> Tensor:
        """sum_k order_k.scatter(y_k): y (B, K*C, L), order k in rows k*C... -> (B, L, C) row-major over grid."""
        if self.sum_over_orders is not None and not torch.compiler.is_compiling():
            return self.sum_over_orders(y, grid, orders)
        parts = y.unflatten(1, (len(orders), -1))
        total = sum(order.scatter(parts[:, k], tuple(grid)) for k, order in enumerate(orders))
        return total.reshape(y.shape[0], y.shape[-1], parts.shape[2])


def conv1d_silu_torch(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return F.silu(F.conv1d(x, weight, bias, padding=weight.shape[-1] - 1, groups=x.shape[1])[..., : x.shape[-1]])


def conv1d_silu_shifted(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """`conv1d_silu_torch` as K shifted multiply-adds in fp32, y_t = SiLU(bias + sum_j w_j x_{t-K+1+j}), in x's
    dtype: under torch.compile inductor fuses it with the gathers before it into one kernel, where ATen's depthwise
    conv1d stays a cuDNN call of its own. The compiled layer alone ran 1-37% faster (BENCHMARKS.md, "The Mamba
    layer: token orders in place vs copies", gather-shifted), whole compiled networks not (within 2%, "Tried and
    rejected" 11), and its backward costs 1.36 ms at 32^3 tokens ("The Mamba layer's kernels per backend"): the
    in-place order kernels under compile are the alternative being measured (`benchmarks/orders_variants.py`)."""
    length, taps = x.shape[-1], weight.shape[-1]
    padded = F.pad(x.float(), (taps - 1, 0))
    w = weight.float()[:, 0]
    y = sum(w[:, j, None] * padded[..., j : j + length] for j in range(taps))
    if bias is not None:
        y = y + bias.float()[:, None]
    return F.silu(y).to(x.dtype)


TORCH_OPS = ScanOps("torch", "exact PyTorch chunked scan", conv1d_silu_torch, torch_selective_scan)


def batch_slices(batch: int, elements_per_sample: int) -> list[slice]:
    """Batch slices whose kernel tensors stay under KERNEL_ELEMENT_LIMIT; an error if one sample does not."""
    if elements_per_sample > KERNEL_ELEMENT_LIMIT:
        raise RuntimeError(f"One sample of this Mamba layer needs {elements_per_sample} elements in one kernel "
                           f"tensor, beyond mamba-ssm's 32-bit indexing ({KERNEL_ELEMENT_LIMIT}). Use a smaller "
                           f"patch or fewer channels at this stage, or the exact PyTorch scan (NNUNET_SEGMAMBA_SCAN=torch).")
    step = max(1, KERNEL_ELEMENT_LIMIT // max(1, elements_per_sample))
    return [slice(start, start + step) for start in range(0, batch, step)]


def split_scan(kernel: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """`kernel` (selective_scan_fn's contract) called on batch slices that fit its 32-bit indexing."""
    def scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
             z: Tensor | None = None, delta_bias: Tensor | None = None, delta_softplus: bool = False) -> Tensor:
        _, dim, length = u.shape
        state = dim * math.ceil(length / 2048) * 2 * A.shape[-1]
        slices = batch_slices(u.shape[0], max(dim * length, state))
        if len(slices) == 1:
            return kernel(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
        return torch.cat([kernel(u[s], delta[s], A, B[s], C[s], D, None if z is None else z[s], delta_bias,
                                 delta_softplus) for s in slices])
    return scan


def split_conv(kernel: Callable[[Tensor, Tensor, Tensor | None], Tensor]) -> Callable[..., Tensor]:
    """`kernel` (conv1d_silu's contract) called on batch slices that fit its 32-bit indexing."""
    def conv(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        slices = batch_slices(x.shape[0], x.shape[1] * x.shape[2])
        if len(slices) == 1:
            return kernel(x, weight, bias)
        return torch.cat([kernel(x[s], weight, bias) for s in slices])
    return conv


def _mamba_kernel_import() -> tuple[ScanOps | None, str]:
    """mamba-ssm's kernels as ScanOps (split by batch where they would overflow), or (None, why not)."""
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except Exception as error:  # ImportError, or OSError "undefined symbol" for a build of another torch
        return None, f"mamba-ssm could not be imported ({type(error).__name__}: {error})"
    try:
        from causal_conv1d import causal_conv1d_fn
    except Exception:
        return ScanOps("cuda", "mamba-ssm selective scan; conv1d in PyTorch (no causal-conv1d)",
                       conv1d_silu_torch, split_scan(selective_scan_fn)), ""

    def conv1d_silu(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        bias = None if bias is None else bias.to(x.dtype)
        return causal_conv1d_fn(x, weight.squeeze(1).to(x.dtype), bias, activation="silu")

    return ScanOps("cuda", "mamba-ssm selective scan + causal-conv1d", split_conv(conv1d_silu),
                   split_scan(selective_scan_fn)), ""


@functools.cache
def _cuda_ops(device_index: int) -> tuple[ScanOps | None, str]:
    """The kernels if they import and run on this GPU (a tiny scan, once per device)."""
    ops, reason = _mamba_kernel_import()
    if ops is None:
        return None, reason
    problem = probe(ops, torch.device("cuda", device_index))
    return (None, problem) if problem else (ops, "")


@functools.cache
def _triton_ops(device_index: int) -> tuple[ScanOps | None, str]:
    """Our Triton scan as ScanOps if Triton imports and the kernels run on this GPU, else (None, why not)."""
    try:
        from nnunet_segmamba.mamba.triton_orders import ordered_conv1d_silu, sum_over_orders
        from nnunet_segmamba.mamba.triton_scan import triton_selective_scan
    except Exception as error:  # no triton in this torch build
        return None, f"Triton could not be imported ({type(error).__name__}: {error})"
    ops = ScanOps("triton", "Triton selective scan and token orders", conv1d_silu_shifted, triton_selective_scan,
                  ordered_conv1d_silu, sum_over_orders)  # conv1d_silu: under torch.compile only (`conv_in_orders`)
    problem = probe(ops, torch.device("cuda", device_index))
    return (None, problem) if problem else (ops, "")


GPU_OPS = {"cuda": _cuda_ops, "triton": _triton_ops}
AUTO_PREFERENCE = ("cuda", "triton")
"""What ``auto`` tries on a CUDA device, first to last, before the PyTorch scan."""
FIX_HINTS = {"cuda": CUDA_INSTALL_HINT,
             "triton": "use a torch build that ships Triton (the Linux CUDA wheels do), or backend 'cuda'"}


def probe(ops: ScanOps, device: torch.device) -> str:
    """Why `ops` cannot run on `device` ('' if a tiny conv + scan runs and equals the PyTorch scan's result)."""
    g = torch.Generator().manual_seed(0)
    x, B, C = (torch.randn(*shape, generator=g).to(device) for shape in ((1, 2, 40), (1, 4, 40), (1, 4, 40)))
    A = -torch.ones(2, 4, device=device)
    try:
        y = ops.selective_scan(x, x.abs(), A, B, C)
        ops.conv1d_silu(x, torch.ones(2, 1, 4, device=device), None)
        orders = (TokenOrder((0,)),)  # the kernels that read token orders in place, where a backend has them
        u = ops.conv_in_orders(x.mT, (40,), orders, torch.ones(2, 1, 4, device=device), None)
        ops.sum_orders(u, (40,), orders)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    except Exception as error:  # e.g. "no kernel image is available for execution on the device"
        return f"{ops.description} does not run on {device} ({type(error).__name__}: {error})"
    expected = torch_selective_scan(x, x.abs(), A, B, C)
    error = ((y.float() - expected).norm() / expected.norm()).item()
    if not error < 1e-3:  # also NaN
        return f"{ops.description} failed a self-test against the PyTorch scan (relative error {error:.1e})"
    return ""


def requested_backend(backend: str | None = None) -> str:
    """The backend asked for: the argument, else $NNUNET_SEGMAMBA_SCAN, else 'auto'."""
    choice = (backend or os.environ.get(BACKEND_ENV) or "auto").strip().lower()
    if choice not in CHOICES:
        source = "backend argument" if backend else f"environment variable {BACKEND_ENV}"
        raise ValueError(f"Unknown scan backend {choice!r} (from the {source}); choose one of {', '.join(CHOICES)}.")
    return choice


_CHOSEN: dict[tuple[str, str, int | None], ScanOps] = {}
"""Kernels chosen so far, by (choice, device type, device index). A plain dict rather than functools.cache:
torch.compile traces through functools caches, and the choice's imports and GPU self-test break the graph
(one break per Mamba layer, 'Import failure' without mamba-ssm). Looked up once before compiling (our trainers
log it in `initialize`), the choice is a dict read in the graph."""


def scan_ops(device: torch.device, backend: str | None = None) -> ScanOps:
    """The kernels a Mamba layer uses for tensors on `device` (see the module docstring)."""
    key = (requested_backend(backend), device.type, _index(device))
    if key not in _CHOSEN:
        _CHOSEN[key] = _resolve(*key)
    return _CHOSEN[key]


def _index(device: torch.device) -> int | None:
    """The device's index; for 'cuda' without one, the current GPU's."""
    return torch.cuda.current_device() if device.type == "cuda" and device.index is None else device.index


def _resolve(choice: str, device_type: str, device_index: int | None) -> ScanOps:
    if choice == "torch":
        ops = TORCH_OPS
    elif device_type != "cuda":
        if choice != "auto":
            raise RuntimeError(f"Scan backend {choice!r} was requested, but the tensors are on {device_type}. "
                               f"Run on a CUDA device, or use backend 'torch' / 'auto'.")
        ops = TORCH_OPS
    else:
        reasons = []
        for kernels in AUTO_PREFERENCE if choice == "auto" else (choice,):
            ops, reason = GPU_OPS[kernels](device_index)
            if ops is not None:
                break
            reasons.append(reason)
            if choice != "auto":
                raise RuntimeError(f"Scan backend {choice!r} was requested, but {reason}. Fix: {FIX_HINTS[choice]}.")
        else:
            hints = "; or ".join(FIX_HINTS[k] for k in AUTO_PREFERENCE)
            warnings.warn(f"nnunet-segmamba: {'; '.join(reasons)}; using the exact PyTorch scan instead, which is "
                          f"several times slower and needs more memory. Fix: {hints}.", stacklevel=3)
            ops = TORCH_OPS
    if not torch.compiler.is_compiling():
        logger.info("Mamba scan backend on %s: %s (%s)", device_type, ops.name, ops.description)
    return ops


COMPILED_BACKEND = "triton"
"""What `auto` means for a network under torch.compile: Triton kernels compile into the graph, while mamba-ssm's
are calls that dynamo cannot trace (a graph break at every scan). H200, 128^3 plan, batch 2 (BENCHMARKS.md,
"torch.compile"): compiled with the Triton scan a training step of SegMamba-V2 / SegMamba / MambaClinix takes 73.1 /
97.4 / 116.7 ms, no graph breaks, against 112.8 / 123.2 / 192.0 ms eager with mamba-ssm's kernels (same run);
compiling SegMamba and MambaClinix with mamba-ssm's kernels had not finished after 580 s."""


def backend_for_compile(device: torch.device) -> str | None:
    """COMPILED_BACKEND if nothing else was asked for (`auto`) and it runs on the CUDA `device`, else None."""
    if device.type != "cuda" or requested_backend() != "auto":
        return None
    ops, _ = GPU_OPS[COMPILED_BACKEND](_index(device))
    return COMPILED_BACKEND if ops is not None else None


def describe_backend(device: torch.device, backend: str | None = None) -> str:
    """One line for logs: which backend runs on `device` and why."""
    choice = requested_backend(backend)
    ops = scan_ops(device, backend)
    return f"Mamba scan backend: {ops.name} ({ops.description}; requested: {choice}, device: {device})"
