"""Region-specific Tversky loss (Chen et al., "Adaptive Region-Specific Loss for Improved Medical Image
Segmentation", TPAMI 2023), as MambaClinix trains with it, and its deep-supervised compound with Dice + CE.

Region grid: regions of about `region_size` (8) voxels per axis of the patch, grid = p / 8 per axis,
rounded, at least 1 (128^3 -> 16^3 regions; 64 x 64 x 112 -> the released code's 8 x 8 x 14). Deep supervision:
every output keeps the patch's grid, clamped per axis to the output's size, so a region covers the same
part of the patch at every scale until the output has fewer voxels than regions (then one voxel each).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

REGION_SIZE = 8
"""Voxels per region and axis at full resolution (the grid rule above)."""

ADAPTIVE_AVG_POOL = {1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}


def region_grid(patch_size: Sequence[int], region_size: int = REGION_SIZE) -> tuple[int, ...]:
    """Regions per axis for a patch: p / region_size rounded (halves up), at least 1."""
    return tuple(max(1, int(p / region_size + 0.5)) for p in patch_size)


def deep_supervision_grids(grid: Sequence[int], patch_size: Sequence[int],
                           scales: Sequence[Sequence[float]]) -> list[tuple[int, ...]]:
    """The grid at each deep-supervision output (patch * scale voxels): `grid` clamped to the output's size."""
    return [tuple(min(g, max(1, round(p * s))) for g, p, s in zip(grid, patch_size, scale)) for scale in scales]


def tversky_weights(fp: Tensor, fn: Tensor, A: float = 0.3, B: float = 0.4,
                    smooth: float = 1e-5) -> tuple[Tensor, Tensor]:
    """Per-region alpha = A + B (FP + s) / (FP + FN + s) and beta = A + B (FN + s) / (FP + FN + s): the
    error type that dominates a region is weighted more; alpha, beta in (A, A + B], their sum in (2A + B, 2A + 2B]."""
    total = fp + fn + smooth
    return A + B * (fp + smooth) / total, A + B * (fn + smooth) / total


class RegionTverskyLoss(nn.Module):
    """Mean over samples, foreground classes and regions r of 1 - T_r, from softmax probabilities p and the
    one-hot target y of a label map:

        TP_r, FP_r, FN_r = avgpool_r(p * y), avgpool_r(p * (1 - y)), avgpool_r((1 - p) * y)
        alpha_r = A + B * (FP_r + s) / (FP_r + FN_r + s),   beta_r = A + B * (FN_r + s) / (FP_r + FN_r + s)
        T_r     = (TP_r + s) / (TP_r + alpha_r * FP_r + beta_r * FN_r + s)

    A = 0.3, B = 0.4, s = 1e-5 (see `tversky_weights`). Background (class 0) is excluded; voxels labelled
    `ignore_label` count nowhere. Computed in fp32 with autocast off.

    forward: logits (B, C, *spatial), target label map (B, 1, *spatial) -> scalar. Raises ValueError for
    one-hot/region targets (several target channels), fewer than 2 classes, or a grid finer than the output.
    """

    def __init__(self, num_regions: Sequence[int], ignore_label: int | None = None, A: float = 0.3, B: float = 0.4,
                 smooth: float = 1e-5) -> None:
        super().__init__()
        self.num_regions = tuple(int(n) for n in num_regions)
        self.ignore_label = ignore_label
        self.A, self.B, self.smooth = A, B, smooth

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        self._check(logits, target)
        with torch.autocast(logits.device.type, enabled=False):
            probs = torch.softmax(logits.float(), dim=1)[:, 1:]
            labels = target.long()
            if self.ignore_label is not None:  # ignored voxels: background target (dropped), no prediction
                valid = labels != self.ignore_label
                labels, probs = labels * valid, probs * valid
            onehot = torch.zeros(logits.shape, device=logits.device).scatter_(1, labels, 1)[:, 1:]
            pooled = ADAPTIVE_AVG_POOL[len(self.num_regions)](
                torch.cat((probs * onehot, probs, onehot), dim=1), self.num_regions)
            tp, predicted, actual = pooled.chunk(3, dim=1)
            fp, fn = (predicted - tp).clamp_min(0), (actual - tp).clamp_min(0)
            alpha, beta = tversky_weights(fp, fn, self.A, self.B, self.smooth)
            tversky = (tp + self.smooth) / (tp + alpha * fp + beta * fn + self.smooth)
            return (1 - tversky).mean()

    def _check(self, logits: Tensor, target: Tensor) -> None:
        if target.shape[1] != 1:
            raise ValueError(f"RegionTverskyLoss needs a label map (B, 1, *spatial) as target, got {target.shape[1]} "
                             f"channels: region-based (BraTS-style, overlapping) labels are not supported by the "
                             f"region-specific Tversky loss. Use nnUNetTrainerMambaClinix (Dice + BCE) for them.")
        if logits.shape[1] < 2:
            raise ValueError(f"RegionTverskyLoss needs background plus at least one class, got {logits.shape[1]} "
                             f"output channel(s).")
        spatial = tuple(logits.shape[2:])
        if len(spatial) != len(self.num_regions) or any(n > size for n, size in zip(self.num_regions, spatial)):
            raise ValueError(f"RegionTverskyLoss's region grid {self.num_regions} does not fit an output of spatial "
                             f"size {spatial}: it needs one entry per axis and at most one region per voxel (build "
                             f"the grids with deep_supervision_grids for deep-supervision outputs).")


class WeightedSumLoss(nn.Module):
    """sum_k w_k * loss_k(*args): e.g. (Dice + CE) + 0.8 * RST, both deep-supervised or both not."""

    def __init__(self, losses: Sequence[nn.Module], weights: Sequence[float]) -> None:
        super().__init__()
        if len(losses) != len(weights):
            raise ValueError(f"{type(self).__name__} got {len(losses)} losses but {len(weights)} weights.")
        self.losses = nn.ModuleList(losses)
        self.weights = tuple(float(w) for w in weights)

    def forward(self, *args: Tensor | Sequence[Tensor]) -> Tensor:
        return sum(w * loss(*args) for loss, w in zip(self.losses, self.weights))


class ScaleWiseLoss(WeightedSumLoss):
    """Deep supervision with a loss per output: sum_i w_i * loss_i(outputs[i], targets[i]); w_i = 0 skipped.

    nnU-Net's DeepSupervisionWrapper applies one loss to every output; RegionTverskyLoss's grid depends on the
    output's size, so each output gets its own.
    """

    def forward(self, outputs: Sequence[Tensor], targets: Sequence[Tensor]) -> Tensor:
        return sum(w * loss(o, t) for loss, w, o, t in zip(self.losses, self.weights, outputs, targets) if w != 0)


def region_tversky_loss(patch_size: Sequence[int], scales: Sequence[Sequence[float]] | None = None,
                        weights: Sequence[float] | None = None, ignore_label: int | None = None,
                        region_size: int = REGION_SIZE) -> nn.Module:
    """The RST loss for a patch size: one RegionTverskyLoss, or with deep-supervision `scales` (nnU-Net's
    `_get_deep_supervision_scales`) a ScaleWiseLoss with each output's clamped grid and `weights` (default 1)."""
    grid = region_grid(patch_size, region_size)
    if scales is None:
        return RegionTverskyLoss(grid, ignore_label)
    grids = deep_supervision_grids(grid, patch_size, scales)
    return ScaleWiseLoss([RegionTverskyLoss(g, ignore_label) for g in grids],
                         [1.0] * len(grids) if weights is None else weights)
