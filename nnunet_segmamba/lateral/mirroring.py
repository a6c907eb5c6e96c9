"""What a trainer does with lateral labels: detected from the dataset, chosen by mode, kept in the plans.

Modes: "exclude" (the default where lateral pairs exist) takes the left-right axis out of nnU-Net's mirror axes, in
training and test-time mirroring; "swap" mirrors along every axis as nnU-Net does, and a flip along the left-right
axis swaps the paired labels (training) or output channels (test-time mirroring); "off" is nnU-Net's mirroring as
it is. Exclude is the default because it scored as well or better in our measurement (BENCHMARKS.md,
"Accuracy": one fold, H200).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from nnunet_segmamba.lateral.axis import AXIS_KEY, training_axis
from nnunet_segmamba.lateral.pairs import channel_pairs, label_pairs

MODE_VARIABLE = "NNUNET_SEGMAMBA_LATERAL"
MODES = ("swap", "exclude", "off")
DEFAULT_MODE = "exclude"
PLANS_KEY = "lateral_mirroring"


@dataclass(frozen=True)
class LateralMirroring:
    """Lateral mirroring of one trained model, stored in its plans (PLANS_KEY): the trainer, its final validation
    and nnUNetv2_predict all read it from there.

    `axis` is the left-right axis of the preprocessed 3D arrays (after transpose_forward); `label_pairs` the
    segmentation values a left-right flip swaps, `channel_pairs` the network outputs it swaps (swap mode)."""

    mode: str
    axis: int
    label_pairs: tuple[tuple[int, int], ...]
    channel_pairs: tuple[tuple[int, int], ...] = ()

    def patch_axis(self, dimension: int) -> int | None:
        """The left-right axis of a configuration's patches: in 3D `axis`; in 2D (slices of the 3D arrays along
        axis 0) one less, None when the slices are cut along the left-right axis."""
        if dimension == 3:
            return self.axis
        return self.axis - 1 if self.axis > 0 else None

    def describe(self, dimension: int) -> str:
        pairs = ", ".join(f"{a}<->{b}" for a, b in self.label_pairs)
        axis = self.patch_axis(dimension)
        where = f"on axis {axis}" if axis is not None else "(the 2D slices are cut along the left-right axis)"
        return f"lateral pairs: {pairs} {where} ({self.mode})"

    def to_plans(self) -> dict:
        return {"mode": self.mode, "axis": self.axis, "label_pairs": [list(p) for p in self.label_pairs],
                "channel_pairs": [list(p) for p in self.channel_pairs]}

    @classmethod
    def from_plans(cls, plans: Mapping) -> LateralMirroring | None:
        stored = plans.get(PLANS_KEY)
        if stored is None:
            return None
        return cls(stored["mode"], stored["axis"], tuple(map(tuple, stored["label_pairs"])),
                   tuple(map(tuple, stored["channel_pairs"])))


def requested_mode(trainer_mode: str | None = None) -> str:
    """The trainer's own mode (a variant's `lateral_mode`), else NNUNET_SEGMAMBA_LATERAL, else exclude."""
    mode = (trainer_mode or os.environ.get(MODE_VARIABLE) or DEFAULT_MODE).lower()
    if mode not in MODES:
        raise ValueError(f"{MODE_VARIABLE}={mode!r}: expected one of {', '.join(MODES)} (default {DEFAULT_MODE}).")
    return mode


def detect(dataset_json: Mapping, plans: Mapping, cases: Callable[[], Mapping[str, Mapping]],
           regions: Sequence | None, mode: str) -> LateralMirroring | None:
    """The lateral mirroring for a dataset, or None (nnU-Net's mirroring) when mode is "off" or it has no pairs.

    `plans` are nnU-Net's plans (read: transpose_forward), `cases` returns the preprocessed cases' properties
    (axis.read_case_properties; called only for a dataset with pairs), `regions` are the label manager's foreground
    regions for region-based training (else None)."""
    if mode == "off":
        return None
    pairs = label_pairs(dataset_json)
    if not pairs:
        return None
    axis = training_axis(cases(), plans["transpose_forward"], dataset_json.get(AXIS_KEY))
    outputs = channel_pairs(pairs, regions) if mode == "swap" else []
    return LateralMirroring(mode, axis, tuple(pairs), tuple(outputs))
