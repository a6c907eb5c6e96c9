"""The left-right axis of the arrays nnU-Net trains on, from the geometry its image reader recorded.

nnU-Net's preprocessing keeps what its reader returned for each case (`<case>.pkl` in the preprocessed folder):
SimpleITKIO the image's direction matrix (columns: the index axes i, j, k in LPS space, as in the file),
NibabelIO the file's affine, NibabelIOWithReorient the affine after reorienting to RAS. Both readers return arrays
with the index axes reversed (array axis 2 is index axis i); preprocessing then transposes them by the plans'
`transpose_forward`. The physical left-right axis is x in LPS and RAS alike.
"""

from __future__ import annotations

import math
import pickle
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

AXIS_KEY = "left_right_axis"
"""dataset.json key that overrides the geometry: the left-right axis (0, 1 or 2) of the arrays nnU-Net's reader
returns, before transpose_forward (e.g. 2 for x in SimpleITK's (z, y, x) arrays)."""

MAX_OBLIQUE_DEGREES = 35.0
"""An image axis counts as left-right when it lies within this angle of the physical x axis."""

_WHAT_TO_DO = (f"declare the axis in dataset.json (\"{AXIS_KEY}\": the left-right axis 0, 1 or 2 of the arrays "
               f"nnU-Net's reader returns), or train with nnU-Net's mirroring (NNUNET_SEGMAMBA_LATERAL=off)")


class LateralAxisError(ValueError):
    """The left-right axis cannot be told from the data; the message says what to do."""


def reader_axis(properties: Mapping, case: str = "a case") -> int:
    """The left-right axis (0, 1 or 2) of the array nnU-Net's reader returned, from the geometry it recorded."""
    if "sitk_stuff" in properties:
        dimension = len(properties["sitk_stuff"]["spacing"])
        if dimension not in (2, 3):
            raise LateralAxisError(f"{case}: a {dimension}D image; the left-right axis is known for 2D and 3D images "
                                   f"only: {_WHAT_TO_DO}.")
        columns = np.reshape(np.asarray(properties["sitk_stuff"]["direction"], float), (dimension, dimension))
    elif "nibabel_stuff" in properties:
        stuff = properties["nibabel_stuff"]
        columns = np.asarray(stuff.get("reoriented_affine", stuff["original_affine"]), float)[:3, :3]
    else:
        raise LateralAxisError(f"{case}: nnU-Net's reader for this dataset records no orientation (only SimpleITKIO, "
                               f"NibabelIO and NibabelIOWithReorient do): {_WHAT_TO_DO}.")
    alignment = np.abs(columns[0]) / np.linalg.norm(columns, axis=0)
    index_axis = int(np.argmax(alignment))
    angle = math.degrees(math.acos(min(1.0, alignment[index_axis])))
    if angle > MAX_OBLIQUE_DEGREES:
        raise LateralAxisError(f"{case}: no image axis runs left-right (the closest is {angle:.0f} degrees oblique, "
                               f"more than {MAX_OBLIQUE_DEGREES:.0f}): {_WHAT_TO_DO}.")
    return 2 - index_axis


def training_axis(cases: Mapping[str, Mapping], transpose_forward: Sequence[int], declared: int | None = None) -> int:
    """The left-right axis of the preprocessed arrays (after transpose_forward): `declared` (an axis of the reader's
    arrays) or the one the geometry of every case gives; cases that disagree are an error."""
    if declared is None:
        if not cases:
            raise LateralAxisError(f"No preprocessed cases to read the left-right axis from: run "
                                   f"nnUNetv2_plan_and_preprocess first, or {_WHAT_TO_DO}.")
        cases_by_axis: dict[int, list[str]] = {}
        for case, properties in sorted(cases.items()):
            cases_by_axis.setdefault(reader_axis(properties, case), []).append(case)
        if len(cases_by_axis) > 1:
            found = "; ".join(f"axis {axis} in {len(names)} (e.g. {names[0]})" for axis, names in
                              sorted(cases_by_axis.items(), key=lambda item: -len(item[1])))
            raise LateralAxisError(
                f"The training cases do not agree on their left-right axis: {found}. Reorient them alike (e.g. "
                f"\"overwrite_image_reader_writer\": \"NibabelIOWithReorient\" in dataset.json reorients every case "
                f"to RAS; then nnUNetv2_plan_and_preprocess again), or {_WHAT_TO_DO}.")
        (declared,) = cases_by_axis
    elif declared not in (0, 1, 2):
        raise LateralAxisError(f"dataset.json \"{AXIS_KEY}\": {declared!r} is no axis; give 0, 1 or 2.")
    return list(transpose_forward).index(declared)


def read_case_properties(folder: str | Path) -> dict[str, dict]:
    """{case: properties} of the cases nnU-Net preprocessed into `folder` (its `<case>.pkl` files)."""
    cases = {}
    for path in sorted(Path(folder).glob("*.pkl")):
        with open(path, "rb") as file:
            cases[path.stem] = pickle.load(file)
    return cases
