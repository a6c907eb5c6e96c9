"""What every trainer of ours shares: the network from the plans, mixed precision, torch.compile, logs."""

from __future__ import annotations

import contextlib
import os
from typing import Any, ClassVar

import numpy as np
import torch
import torch._dynamo
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager
from torch import nn

from nnunet_segmamba.mamba import backend_for_compile, describe_backend, use_backend
from nnunet_segmamba.networks.plans import build_network

COMPILE_EVIDENCE = (
    "H200, 128^3 plan, batch 2, Triton scan (BENCHMARKS.md): training steps 1.54x (SegMamba-V2), 1.27x (SegMamba), "
    "1.65x (MambaClinix) faster than eager, 103-125 s to compile, no graph breaks"
)
"""Why our trainers compile by default, as nnU-Net's own do (nnUNet_compile=0 turns it off)."""


AMP_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
AMP_VARIABLE = "NNUNET_SEGMAMBA_AMP"


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The training autocast dtype: fp16 with nnU-Net's GradScaler unless NNUNET_SEGMAMBA_AMP=bf16 (no loss
    scaling); None (no autocast) off CUDA.

    fp16 by default from the measurements in BENCHMARKS.md (H200, 300 iterations per network, same seed):
    the same loss curves as bf16 with no step skipped by the GradScaler, the same peak memory, and steps 1%
    (SegMamba-V2), 11% (SegMamba) and 15% (MambaClinix) faster; it is also what nnU-Net's own trainers use,
    so comparisons with them differ only in the network.
    """
    choice = os.environ.get(AMP_VARIABLE, "fp16").lower()
    if choice not in AMP_DTYPES:
        raise ValueError(f"{AMP_VARIABLE}={choice!r}: expected one of {', '.join(AMP_DTYPES)} (default fp16).")
    if device.type != "cuda":
        return None
    if choice == "bf16" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"{AMP_VARIABLE}=bf16 but {torch.cuda.get_device_name(device)} has no bf16: unset it "
                         f"(fp16 with loss scaling, the default).")
    return AMP_DTYPES[choice]


def compile_requested() -> bool:
    return os.environ.get("nnUNet_compile", "").lower() in ("true", "1", "t")


def describe_compile(compiled: bool, backend: str | None) -> str:
    """The training log's line on torch.compile (CUDA only: nnU-Net never compiles on the CPU)."""
    if compiled:
        scan = (f"; Mamba scan backend {backend}: it compiles into the graph (mamba-ssm's kernels would break it at "
                f"every scan)") if backend else ""
        state = f"on (nnU-Net's default; nnUNet_compile=0 turns it off){scan}"
    else:
        value = os.environ.get("nnUNet_compile")
        state = f"off (nnUNet_compile={value}; unset it to compile)" if value else "off (nnU-Net does not compile here)"
    return f"torch.compile: {state}. {COMPILE_EVIDENCE}"


def compile_with_static_shapes() -> None:
    """Make torch.compile recompile for a new input shape instead of generalising to symbolic sizes.

    nnU-Net feeds a network two shapes per configuration (the training batch, and one patch in the sliding
    window), so static graphs cost one compile each, as dynamic ones do. Symbolic sizes broke MambaClinix in
    nnUNetv2_predict (H200, torch 2.11: InductorError "vr must not be None for symbol ps0", BENCHMARKS.md)."""
    torch._dynamo.config.automatic_dynamic_shapes = False


class nnUNetTrainerMambaBase(nnUNetTrainer):
    """nnU-Net's trainer with `network_class` built from the plans (plus `network_options`), fp16 autocast
    with GradScaler (bf16 by NNUNET_SEGMAMBA_AMP), torch.compile on CUDA as in nnU-Net (with our Triton scan,
    static shapes), the scan backend in the log, checkpoints written atomically, and a stop after
    `max_non_finite_steps` consecutive non-finite losses."""

    network_class: ClassVar[type[nn.Module]]
    network_options: ClassVar[dict[str, Any]] = {}
    max_non_finite_steps: ClassVar[int] = 50

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.amp_dtype = autocast_dtype(self.device)
        if self.amp_dtype == torch.bfloat16:
            self.grad_scaler = None
        self.non_finite_steps = self.epoch_step = 0

    @classmethod
    def build_network_architecture(cls, plans_manager: PlansManager, configuration_manager: ConfigurationManager,
                                   num_input_channels: int, num_output_channels: int,
                                   enable_deep_supervision: bool = True) -> nn.Module:
        network = build_network(cls.network_class, configuration_manager, num_input_channels, num_output_channels,
                                enable_deep_supervision, **cls.network_options)
        if compile_requested() and torch.cuda.is_available():
            # nnUNetv2_predict compiles the network built here when nnUNet_compile is set (our trainers decide again
            # in `initialize`): the scan that compiles into the graph, on static shapes
            use_backend(network, backend_for_compile(torch.device("cuda")))
            compile_with_static_shapes()
        return network

    def initialize(self) -> None:
        super().initialize()
        compiled = self._do_i_compile()
        backend = backend_for_compile(self.device) if compiled else None
        use_backend(self.network, backend)
        if compiled:
            compile_with_static_shapes()
        self.print_to_log_file(describe_backend(self.device, backend))
        if self.amp_dtype is None:
            self.print_to_log_file("Mixed precision: off (not on CUDA)")
        else:
            scaler = "no loss scaling" if self.grad_scaler is None else "GradScaler"
            self.print_to_log_file(f"Mixed precision: {self.amp_dtype} autocast, {scaler} ({AMP_VARIABLE}=fp16|bf16)")
        if self.device.type == "cuda":
            self.print_to_log_file(describe_compile(compiled, backend))

    def _autocast(self) -> contextlib.AbstractContextManager:
        """Sets the dtype that nnU-Net's own `autocast(enabled=True)` inside the steps picks up."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()
        self.epoch_step = 0

    def train_step(self, batch: dict) -> dict:
        with self._autocast():
            result = super().train_step(batch)
        self.epoch_step += 1
        self._stop_if_diverged(result["loss"])
        return result

    def _stop_if_diverged(self, loss: np.ndarray) -> None:
        """Raise once the loss has not been finite for `max_non_finite_steps` steps in a row: from there on a
        run only produces NaN weights, for days."""
        self.non_finite_steps = 0 if np.isfinite(loss).all() else self.non_finite_steps + 1
        if self.non_finite_steps < self.max_non_finite_steps:
            return
        precision = f"{self.amp_dtype} autocast" if self.amp_dtype is not None else "fp32"
        raise RuntimeError(
            f"Training stopped at epoch {self.current_epoch}, step {self.epoch_step}: the loss was not finite for "
            f"{self.non_finite_steps} consecutive steps (under {precision}). Try bf16 autocast ({AMP_VARIABLE}=bf16, "
            f"fp32's exponent range), a lower initial_lr, or check the data (nnUNetv2_plan_and_preprocess "
            f"--verify_dataset_integrity). The last finite weights are in checkpoint_latest.pth / checkpoint_best.pth "
            f"of {self.output_folder}.")

    def save_checkpoint(self, filename: str) -> None:
        """nnU-Net's checkpoint, written to `filename`.partial and renamed: an interrupted save never leaves a
        half-written checkpoint for `--c` to load."""
        partial = f"{filename}.partial"
        try:
            super().save_checkpoint(partial)
            if os.path.isfile(partial):
                os.replace(partial, filename)
        finally:
            if os.path.exists(partial):
                os.remove(partial)

    def validation_step(self, batch: dict) -> dict:
        with self._autocast():
            return super().validation_step(batch)
