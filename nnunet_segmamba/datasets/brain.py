"""Cases derived from a real brain MRI: the MNI152 2009a symmetric template that the PyPI package nilearn ships.

Each case is the template's T1 image (1 mm, resampled to `spacing`) under a random affine and smooth elastic
deformation, with a random gamma, bias field and noise. Its labels follow a rule, not an annotator: at each voxel
the largest of the template's (equally deformed) grey-matter, white-matter and remaining probabilities, and the
side of the template's midline (x = 0 of its symmetric space) the voxel came from: ``gray_matter_left`` /
``gray_matter_right`` / ``white_matter_left`` / ``white_matter_right``, two lateral pairs on real anatomy.
Arrays are (D, H, W) = (inferior-superior, posterior-anterior, left-right), low W the patient's left, as
`synthetic` writes them. Nothing is downloaded: the files come with nilearn's wheel (pip install nilearn).
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np

BRAIN_LABELS = {"background": 0, "gray_matter_left": 1, "gray_matter_right": 2, "white_matter_left": 3,
                "white_matter_right": 4}
TEMPLATE = "mni_icbm152_{}_tal_nlin_sym_09a_converted.nii.gz"
"""nilearn/datasets/data/ file of each map ({} = t1, gm, wm): 197 x 233 x 189 voxels of 1 mm, RAS, x = 0 at the
midline."""
MARGIN_MM = 6.0


@dataclass(frozen=True)
class BrainSpec:
    """How the brain cases are made. spacing is (D, H, W) in mm; angles in degrees, deformation in mm."""

    spacing: tuple[float, float, float] = (3.0, 3.0, 3.0)
    rotation: float = 10.0
    scaling: float = 0.1
    translation: float = 6.0
    deformation: float = 5.0
    noise: float = 0.04
    bias_field: float = 0.2

    @property
    def channels(self) -> int:
        return 1

    @property
    def labels(self) -> dict[str, int]:
        return BRAIN_LABELS

    @property
    def channel_names(self) -> dict[str, str]:
        return {"0": "T1"}

    def generate(self, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """One case: image (1, D, H, W) float32 and label (D, H, W) uint8."""
        return generate_brain_case(self, seed)


def template_folder() -> Path:
    """nilearn's data folder, found without importing nilearn (its imports are heavy)."""
    spec = importlib.util.find_spec("nilearn")
    folder = Path(spec.origin).parent / "datasets" / "data" if spec and spec.origin else None
    if folder is None or not (folder / TEMPLATE.format("t1")).is_file():
        raise FileNotFoundError("The brain task reads the MNI152 template that the PyPI package nilearn ships: "
                                "pip install nilearn (nothing is downloaded at run time).")
    return folder


@functools.lru_cache(maxsize=2)
def _template(spacing: tuple[float, float, float]) -> tuple[np.ndarray, ...]:
    """(t1, gm, wm) as (D, H, W) float32 arrays in [0, 1] at 1 mm, smoothed for sampling at `spacing` and cropped
    to the brain plus a margin; and the world coordinates (mm, D H W order) of voxel 0."""
    import nibabel
    from scipy.ndimage import gaussian_filter

    folder = template_folder()
    maps = []
    for name in ("t1", "gm", "wm"):
        image = nibabel.load(str(folder / TEMPLATE.format(name)))
        maps.append(np.asarray(image.dataobj, np.float32).transpose(2, 1, 0) / 255.0)  # (x, y, z) -> (D, H, W)
    origin = image.affine[:3, 3][::-1]
    brain = np.argwhere(maps[1] + maps[2] > 0.1)
    low = np.maximum(brain.min(0) - int(MARGIN_MM), 0)
    high = np.minimum(brain.max(0) + int(MARGIN_MM) + 1, maps[0].shape)
    box = tuple(slice(a, b) for a, b in zip(low, high))
    sigma = [max(s / 2.5, 0.0) for s in spacing]  # against aliasing when sampled every `spacing` mm
    return (*(gaussian_filter(m[box], sigma) for m in maps), origin + low)


def generate_brain_case(spec: BrainSpec, seed: int) -> tuple[np.ndarray, np.ndarray]:
    from scipy.ndimage import map_coordinates, zoom

    rng = np.random.default_rng(seed)
    t1, gm, wm, origin = _template(tuple(spec.spacing))
    spacing = np.asarray(spec.spacing)
    shape = tuple(int(n // s) for n, s in zip(t1.shape, spacing))
    centre = (np.asarray(t1.shape) - 1) / 2  # template voxels (1 mm)
    grid = np.stack(np.meshgrid(*(np.arange(n) * s for n, s in zip(shape, spacing)), indexing="ij"))
    grid -= grid.reshape(3, -1).mean(1)[:, None, None, None]  # mm around the output's centre

    # where each output voxel samples the template: centre + A (p + elastic(p)) + t
    matrix = _rotation(rng.uniform(-spec.rotation, spec.rotation, 3)) * rng.uniform(
        1 - spec.scaling, 1 + spec.scaling, 3)[None, :]
    elastic = np.stack([zoom(rng.normal(0, 1, (4, 4, 4)), np.asarray(shape) / 4, order=3)[tuple(slice(0, n)
                                                                                                 for n in shape)]
                        for _ in range(3)])
    elastic *= spec.deformation / max(np.abs(elastic).max(), 1e-6)
    points = np.einsum("ij,j...->i...", matrix, grid + elastic)
    points += (centre + rng.uniform(-spec.translation, spec.translation, 3))[:, None, None, None]
    t1, gm, wm = (map_coordinates(m, points, order=1, mode="constant", cval=0.0) for m in (t1, gm, wm))

    tissue = np.argmax(np.stack([1.0 - gm - wm, gm, wm]), axis=0)  # 0 other, 1 grey, 2 white matter
    right = (origin[2] + points[2]) >= 0  # the template's x (W) in mm: its midline is x = 0, RAS (x grows rightwards)
    label = np.where(tissue == 0, 0, 2 * tissue - 1 + right).astype(np.uint8)

    image = np.clip(t1, 0, None) ** rng.uniform(0.8, 1.25)
    image *= 1.0 + spec.bias_field * _smooth_field(shape, rng)
    image += rng.normal(0.0, spec.noise, shape)
    return image[None].astype(np.float32), label


def _rotation(degrees: np.ndarray) -> np.ndarray:
    """The rotation about the three axes in turn, by `degrees`."""
    matrix = np.eye(3)
    for axis, angle in enumerate(np.deg2rad(degrees)):
        a, b = [i for i in range(3) if i != axis]
        turn = np.eye(3)
        turn[a, a] = turn[b, b] = np.cos(angle)
        turn[a, b], turn[b, a] = -np.sin(angle), np.sin(angle)
        matrix = turn @ matrix
    return matrix


def _smooth_field(shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """A smooth field in [-1, 1]: a random linear ramp plus one low-frequency cosine."""
    grids = np.meshgrid(*(np.linspace(-1, 1, n) for n in shape), indexing="ij")
    ramp = sum(rng.uniform(-1, 1) * g for g in grids) / 3
    wave = np.cos(np.pi * sum(rng.uniform(0.2, 0.8) * g for g in grids) + rng.uniform(0, 2 * np.pi))
    return (ramp + wave) / 2
