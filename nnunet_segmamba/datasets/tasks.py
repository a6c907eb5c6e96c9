"""The generated tasks `synth`, the demo and the evidence scripts write: shapes (`synthetic`) and brains (`brain`).

A task is a spec object with `spacing` (D, H, W), `channels`, `labels` {name: value}, `channel_names` and
`generate(seed) -> (image (C, D, H, W) float32, label (D, H, W) uint8)`.
"""

from __future__ import annotations

from dataclasses import fields, replace
from typing import Any, Protocol

import numpy as np

from nnunet_segmamba.datasets.brain import BrainSpec
from nnunet_segmamba.datasets.synthetic import PRESETS as SHAPE_PRESETS


class Task(Protocol):
    spacing: tuple[float, float, float]
    channels: int

    @property
    def labels(self) -> dict[str, int]: ...

    @property
    def channel_names(self) -> dict[str, str]: ...

    def generate(self, seed: int) -> tuple[np.ndarray, np.ndarray]: ...


TASKS: dict[str, Task] = {**SHAPE_PRESETS, "mni": BrainSpec()}
"""Generated shapes (tiny, iso, aniso, thin, 2d, twochannel) and brains derived from the MNI152 template (mni)."""


def task_from_preset(preset: str, **overrides: Any) -> Task:
    """A preset with some fields replaced (None values are ignored); a clear error for fields it does not have."""
    if preset not in TASKS:
        raise ValueError(f"Unknown preset {preset!r}; choose one of {', '.join(TASKS)}.")
    task = TASKS[preset]
    given = {k: v for k, v in overrides.items() if v is not None}
    unknown = sorted(set(given) - {f.name for f in fields(task)})
    if unknown:
        raise ValueError(f"Preset {preset!r} has no setting {', '.join(unknown)} (it takes "
                         f"{', '.join(f.name for f in fields(task))}).")
    return replace(task, **given)
