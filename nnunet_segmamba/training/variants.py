"""Trainer variants that only change attributes nnU-Net sets in __init__ (epochs, iterations, lr ...)."""

from __future__ import annotations

from typing import Any, TypeVar

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

T = TypeVar("T", bound=type[nnUNetTrainer])


def trainer_variant(base: T, name: str, module: str, **attributes: Any) -> T:
    """A subclass of `base` called `name` that sets `attributes` after nnU-Net's __init__.

    Works for any nnU-Net trainer. `module` is the module that binds the result to `name`, so that the
    class pickles (DDP workers, nnU-Net's export processes). Example:
    ``nnUNetTrainerX_250epochs = trainer_variant(nnUNetTrainerX, "nnUNetTrainerX_250epochs", __name__, num_epochs=250)``
    """
    # nnU-Net records the __init__ arguments by name for checkpoints: keep its exact signature.
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        base.__init__(self, plans, configuration, fold, dataset_json, device)
        for key, value in attributes.items():
            setattr(self, key, value)

    settings = ", ".join(f"{k}={v!r}" for k, v in attributes.items())
    return type(name, (base,), {"__init__": __init__, "__module__": module, "__qualname__": name,
                                "__doc__": f"{base.__name__} with {settings}."})
