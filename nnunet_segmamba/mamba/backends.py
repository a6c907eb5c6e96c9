"""Which implementation runs a Mamba layer's causal conv1d and selective scan.

- ``cuda``: mamba-ssm's selective-scan kernel, and causal-conv1d's kernel when that package is there.
- ``torch``: the exact PyTorch scan of `scan.py` and ``F.conv1d``; any device.

The choice, in order: the layer's ``backend`` argument, the environment variable
``NNUNET_SEGMAMBA_SCAN`` (``auto``, ``cuda`` or ``torch``), then ``auto``: ``cuda`` for CUDA tensors
when mamba-ssm imports and its kernel runs on the GPU, else ``torch``. A forced ``cuda`` that cannot run
is an error; an automatic fall-back is a warning, once. mamba-ssm is imported on first use only: its
import fails on machines without CUDA.
"""

from __future__ import annotations

import functools
import logging
import os
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from nnunet_segmamba.mamba.scan import selective_scan as torch_selective_scan

BACKEND_ENV = "NNUNET_SEGMAMBA_SCAN"
CHOICES = ("auto", "cuda", "torch")
CUDA_INSTALL_HINT = (
    "install the kernels for your torch/CUDA: `pip install --no-build-isolation mamba-ssm causal-conv1d` "
    "(needs nvcc; see README, 'GPU install'), or set NNUNET_SEGMAMBA_SCAN=torch to silence this"
)
logger = logging.getLogger("nnunet_segmamba")


@dataclass(frozen=True)
class ScanOps:
    """The two kernels of a Mamba layer and where they come from."""

    name: str
    description: str
    conv1d_silu: Callable[[Tensor, Tensor, Tensor | None], Tensor]
    """SiLU(causal depthwise conv1d): x (B, C, L), weight (C, 1, K), bias (C,) -> (B, C, L)."""
    selective_scan: Callable[..., Tensor]
    """mamba_ssm's ``selective_scan_fn`` contract (see `scan.selective_scan`)."""


def conv1d_silu_torch(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return F.silu(F.conv1d(x, weight, bias, padding=weight.shape[-1] - 1, groups=x.shape[1])[..., : x.shape[-1]])


TORCH_OPS = ScanOps("torch", "exact PyTorch chunked scan", conv1d_silu_torch, torch_selective_scan)


def _mamba_kernel_import() -> tuple[ScanOps | None, str]:
    """mamba-ssm's kernels as ScanOps, or (None, why not)."""
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except Exception as error:  # ImportError, or OSError "undefined symbol" for a build of another torch
        return None, f"mamba-ssm could not be imported ({type(error).__name__}: {error})"
    try:
        from causal_conv1d import causal_conv1d_fn
    except Exception:
        return ScanOps("cuda", "mamba-ssm selective scan; conv1d in PyTorch (no causal-conv1d)",
                       conv1d_silu_torch, selective_scan_fn), ""

    def conv1d_silu(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        bias = None if bias is None else bias.to(x.dtype)
        return causal_conv1d_fn(x, weight.squeeze(1).to(x.dtype), bias, activation="silu")

    return ScanOps("cuda", "mamba-ssm selective scan + causal-conv1d", conv1d_silu, selective_scan_fn), ""


@functools.cache
def _cuda_ops(device_index: int) -> tuple[ScanOps | None, str]:
    """The kernels if they import and run on this GPU (a tiny scan, once per device)."""
    ops, reason = _mamba_kernel_import()
    if ops is None:
        return None, reason
    try:
        x = torch.randn(1, 2, 8, device=f"cuda:{device_index}")
        y = ops.selective_scan(x, x.abs(), -torch.ones(2, 4, device=x.device),
                               torch.randn(1, 4, 8, device=x.device), torch.randn(1, 4, 8, device=x.device))
        ops.conv1d_silu(x, torch.ones(2, 1, 4, device=x.device), None)
        torch.cuda.synchronize(x.device)
    except Exception as error:  # e.g. "no kernel image is available for execution on the device"
        name = torch.cuda.get_device_name(device_index)
        return None, f"mamba-ssm's kernels do not run on {name} ({type(error).__name__}: {error})"
    if not torch.isfinite(y).all():
        return None, "mamba-ssm's kernel returned non-finite values on a self-test"
    return ops, ""


def requested_backend(backend: str | None = None) -> str:
    """The backend asked for: the argument, else $NNUNET_SEGMAMBA_SCAN, else 'auto'."""
    choice = (backend or os.environ.get(BACKEND_ENV) or "auto").strip().lower()
    if choice not in CHOICES:
        source = "backend argument" if backend else f"environment variable {BACKEND_ENV}"
        raise ValueError(f"Unknown scan backend {choice!r} (from the {source}); choose one of {', '.join(CHOICES)}.")
    return choice


def scan_ops(device: torch.device, backend: str | None = None) -> ScanOps:
    """The kernels a Mamba layer uses for tensors on `device` (see the module docstring)."""
    return _resolve(requested_backend(backend), device.type, device.index)


@functools.cache
def _resolve(choice: str, device_type: str, device_index: int | None) -> ScanOps:
    if choice == "torch":
        ops = TORCH_OPS
    elif device_type != "cuda":
        if choice == "cuda":
            raise RuntimeError(f"Scan backend 'cuda' was requested, but the tensors are on {device_type}. "
                               f"Run on a CUDA device, or use backend 'torch' / 'auto'.")
        ops = TORCH_OPS
    else:
        index = torch.cuda.current_device() if device_index is None else device_index
        ops, reason = _cuda_ops(index)
        if ops is None:
            if choice == "cuda":
                raise RuntimeError(f"Scan backend 'cuda' was requested, but {reason}. Fix: {CUDA_INSTALL_HINT}.")
            warnings.warn(f"nnunet-segmamba: {reason}; using the exact PyTorch scan instead, which is several "
                          f"times slower and needs more memory. Fix: {CUDA_INSTALL_HINT}.", stacklevel=3)
            ops = TORCH_OPS
    logger.info("Mamba scan backend on %s: %s (%s)", device_type, ops.name, ops.description)
    return ops


def describe_backend(device: torch.device, backend: str | None = None) -> str:
    """One line for logs: which backend runs on `device` and why."""
    choice = requested_backend(backend)
    ops = scan_ops(device, backend)
    return f"Mamba scan backend: {ops.name} ({ops.description}; requested: {choice}, device: {device})"
