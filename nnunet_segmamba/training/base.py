"""What every trainer of ours shares: the network from the plans, mixed precision, torch.compile, logs."""

from __future__ import annotations

import contextlib
import os
from typing import Any, ClassVar

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager
from torch import nn

from nnunet_segmamba.mamba import describe_backend
from nnunet_segmamba.networks.plans import build_network

COMPILE_OFF_REASON = (
    "off by default for nnunet-segmamba trainers: the Mamba scan is a custom CUDA op (a graph break per "
    "scan) and compilation has not been shown to pay off for these networks; set nnUNet_compile=1 to try it"
)


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """bf16 where the GPU has it (fp32's exponent range: no loss scaling, no fp16 overflow in the Mamba
    projections, which U-Mamba users hit as NaN losses), else fp16; None (no autocast) off CUDA."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def compile_requested() -> bool:
    return os.environ.get("nnUNet_compile", "").lower() in ("true", "1", "t")


class nnUNetTrainerMambaBase(nnUNetTrainer):
    """nnU-Net's trainer with `network_class` built from the plans (plus `network_options`), bf16 autocast
    where available, torch.compile off unless nnUNet_compile asks, and the scan backend in the log."""

    network_class: ClassVar[type[nn.Module]]
    network_options: ClassVar[dict[str, Any]] = {}

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.amp_dtype = autocast_dtype(self.device)
        if self.amp_dtype == torch.bfloat16:
            self.grad_scaler = None

    @classmethod
    def build_network_architecture(cls, plans_manager: PlansManager, configuration_manager: ConfigurationManager,
                                   num_input_channels: int, num_output_channels: int,
                                   enable_deep_supervision: bool = True) -> nn.Module:
        return build_network(cls.network_class, configuration_manager, num_input_channels, num_output_channels,
                             enable_deep_supervision, **cls.network_options)

    def initialize(self) -> None:
        super().initialize()
        self.print_to_log_file(describe_backend(self.device))
        if self.amp_dtype is None:
            self.print_to_log_file("Mixed precision: off (not on CUDA)")
        else:
            scaler = "no loss scaling" if self.grad_scaler is None else "GradScaler (this GPU has no bf16)"
            self.print_to_log_file(f"Mixed precision: {self.amp_dtype} autocast, {scaler}")
        if self.device.type == "cuda":
            state = "on (nnUNet_compile)" if self._do_i_compile() else COMPILE_OFF_REASON
            self.print_to_log_file(f"torch.compile: {state}")

    def _do_i_compile(self) -> bool:
        return compile_requested() and super()._do_i_compile()

    def _autocast(self) -> contextlib.AbstractContextManager:
        """Sets the dtype that nnU-Net's own `autocast(enabled=True)` inside the steps picks up."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def train_step(self, batch: dict) -> dict:
        with self._autocast():
            return super().train_step(batch)

    def validation_step(self, batch: dict) -> dict:
        with self._autocast():
            return super().validation_step(batch)
