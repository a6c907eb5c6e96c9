"""Generated segmentation cases that exercise what matters for these networks.

Each case (deterministic from its seed) holds, on a smooth textured background with noise and a
multiplicative bias field:
- two identical ellipsoids, labelled ``blob_left`` / ``blob_right`` by the half of the volume they lie
  in along W, the left-right axis (low W is the patient's left, as the files' affine says): the label depends
  on long-range context, not on local appearance (one of them is sometimes absent, so counting does not help).
  They are a lateral pair: a left-right flip turns one into the other, so mirroring must swap them;
- ``tube``: a thin, long, curved tubular structure across the volume;
- ``speck``: a small sphere of a few voxels.
Shapes are drawn in physical units, so anisotropic spacing gives anisotropic voxel shapes. A 2D
dataset is a stack of one slice (shape (1, H, W)), as nnU-Net reads 2D NIfTI data.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

LABELS = {"background": 0, "blob_left": 1, "blob_right": 2, "tube": 3, "speck": 4}


@dataclass(frozen=True)
class SyntheticSpec:
    """What a generated dataset looks like. shape and spacing are (D, H, W); D = 1 makes it 2D."""

    shape: tuple[int, int, int] = (32, 48, 48)
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    channels: int = 1
    noise: float = 0.1
    bias_field: float = 0.3
    size_jitter: float = 0.1
    """Each case's shape varies by up to this fraction per axis."""
    tube_radius: float = 1.5
    """The tube's radius in voxels of the finest in-plane spacing."""
    speck_radius: float = 1.6
    """The speck's radius in voxels along each axis."""

    @property
    def labels(self) -> dict[str, int]:
        return LABELS

    @property
    def channel_names(self) -> dict[str, str]:
        return {str(c): f"synthetic{c}" for c in range(self.channels)}

    def generate(self, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """One case: image (channels, D, H, W) float32 and label (D, H, W) uint8."""
        return generate_case(self, seed)


PRESETS: dict[str, SyntheticSpec] = {
    "tiny": SyntheticSpec(shape=(16, 32, 32), spacing=(2.0, 1.0, 1.0), size_jitter=0.0),
    "iso": SyntheticSpec(shape=(48, 48, 48)),
    "aniso": SyntheticSpec(shape=(16, 64, 64), spacing=(3.0, 0.8, 0.8)),
    "thin": SyntheticSpec(shape=(48, 64, 64), tube_radius=1.0),
    "demo": SyntheticSpec(shape=(16, 24, 24), size_jitter=0.0, speck_radius=2.5),
    "2d": SyntheticSpec(shape=(1, 96, 96)),
    "twochannel": SyntheticSpec(shape=(32, 48, 48), channels=2),
}

# Mean intensity of each structure per channel (channel 1 shows the tube more, the blobs less).
_CONTRAST = {"blob": (1.0, 0.4), "tube": (0.7, 1.2), "speck": (-0.8, -0.5)}


def generate_case(spec: SyntheticSpec, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """One case: image (channels, D, H, W) float32 and label (D, H, W) uint8."""
    rng = np.random.default_rng(seed)
    shape = tuple(1 if n == 1 else max(8, round(n * (1 + rng.uniform(-spec.size_jitter, spec.size_jitter))))
                  for n in spec.shape)
    coords = _physical_coordinates(shape, spec.spacing)
    extent = np.array([max(n * s, 1e-6) for n, s in zip(shape, spec.spacing)])
    flat = shape[0] == 1
    label = np.zeros(shape, np.uint8)

    radius = extent * rng.uniform(0.12, 0.18)
    if flat:
        radius[0] = np.inf
    sides = ["blob_left", "blob_right"] if rng.random() < 0.7 else [rng.choice(["blob_left", "blob_right"])]
    for side in sides:
        centre = extent * rng.uniform(0.3, 0.7, size=3)
        low, high = (0.0, 0.5) if side == "blob_left" else (0.5, 1.0)  # stays inside its half
        centre[2] = rng.uniform(extent[2] * low + radius[2], extent[2] * high - radius[2])
        label[_ellipsoid(coords, centre, radius)] = LABELS[side]

    label[_tube(coords, extent, flat, min(spec.spacing[1:]) * spec.tube_radius, rng)] = LABELS["tube"]
    speck_radius = spec.speck_radius * np.array([0.0 if flat else spec.spacing[0], *spec.spacing[1:]])
    speck_radius[speck_radius == 0] = np.inf
    label[_ellipsoid(coords, extent * rng.uniform(0.15, 0.85, size=3), speck_radius)] = LABELS["speck"]

    image = np.stack([_channel(label, c, spec, rng) for c in range(spec.channels)]).astype(np.float32)
    return image, label


def _physical_coordinates(shape: tuple[int, ...], spacing: tuple[float, ...]) -> list[np.ndarray]:
    return [np.arange(n).reshape([-1 if a == i else 1 for i in range(3)]) * s + s / 2
            for a, (n, s) in enumerate(zip(shape, spacing))]


def _ellipsoid(coords: list[np.ndarray], centre: np.ndarray, radius: np.ndarray) -> np.ndarray:
    return sum(((c - m) / r) ** 2 for c, m, r in zip(coords, centre, radius)) <= 1.0


def _tube(coords: list[np.ndarray], extent: np.ndarray, flat: bool, radius: float,
          rng: np.random.Generator) -> np.ndarray:
    """Voxels within `radius` of a random wiggly curve running along the in-plane axis H."""
    t = np.linspace(0.05, 0.95, 200)
    amplitude, frequency, phase = rng.uniform(0.1, 0.2), rng.uniform(1.0, 2.5), rng.uniform(0, 2 * np.pi)
    points = np.stack([
        np.full_like(t, extent[0] / 2) if flat else extent[0] * (0.5 + 0.3 * np.sin(2 * np.pi * t + phase)),
        extent[1] * t,
        extent[2] * (0.5 + amplitude * np.sin(2 * np.pi * frequency * t + phase)),
    ], axis=1)
    mask = np.zeros(np.broadcast_shapes(*(c.shape for c in coords)), bool)
    for point in points:
        mask |= sum((c - p) ** 2 for c, p in zip(coords, point)) <= radius ** 2
    return mask


def _channel(label: np.ndarray, channel: int, spec: SyntheticSpec, rng: np.random.Generator) -> np.ndarray:
    """Background texture + structure contrasts + noise, times a smooth bias field."""
    image = _smooth_field(label.shape, rng, amplitude=0.2)
    for name, value in LABELS.items():
        if value:
            image[label == value] += _CONTRAST[name.split("_")[0]][channel % 2]
    image += rng.normal(0.0, spec.noise, label.shape)
    return image * (1.0 + _smooth_field(label.shape, rng, amplitude=spec.bias_field))


def _smooth_field(shape: tuple[int, ...], rng: np.random.Generator, amplitude: float) -> np.ndarray:
    """A sum of a few low-frequency cosines, values in about [-amplitude, amplitude]."""
    grids = np.meshgrid(*(np.linspace(0, 1, n) for n in shape), indexing="ij")
    field = np.zeros(shape)
    for _ in range(3):
        frequencies = rng.uniform(0.3, 1.5, size=3)
        field += np.cos(2 * np.pi * sum(f * g for f, g in zip(frequencies, grids)) + rng.uniform(0, 2 * np.pi))
    return amplitude * field / 3
