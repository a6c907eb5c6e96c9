"""Trainer variants that only change attributes nnU-Net sets in __init__ (epochs, iterations, lr ...)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, TypeVar

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


def write_variants_module(folder: str | os.PathLike, module: str, variants: Mapping[str, tuple[type, dict]]) -> Path:
    """Write `folder/module.py` defining `name = trainer_variant(base, ...)` for each of `variants`
    ({name: (base class, attributes)}); point nnUNet_extTrainer at `folder` to use them.

    For short runs (tests, the demo) of any trainer, nnU-Net's or ours, with the stock commands.
    """
    lines = [f'"""Trainer variants written by nnunet-segmamba ({", ".join(variants)})."""',
             "from nnunet_segmamba.training.variants import trainer_variant"]
    for i, (name, (base, attributes)) in enumerate(variants.items()):
        if not name.isidentifier() or "__" in name:
            raise ValueError(f"Trainer name {name!r} must be an identifier without '__' (nnU-Net splits folder "
                             f"names on '__').")
        lines.append(f"from {base.__module__} import {base.__qualname__} as _base{i}")
        settings = "".join(f", {key}={value!r}" for key, value in attributes.items())
        lines.append(f"{name} = trainer_variant(_base{i}, {name!r}, __name__{settings})")
    path = Path(folder) / f"{module}.py"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path
