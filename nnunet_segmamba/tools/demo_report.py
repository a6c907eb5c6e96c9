"""The demo's report: a table of test Dice per trainer, learning curves and slices of a test case with each
trainer's prediction beside the ground truth (report.md, report.json, demo.png), written atomically."""

from __future__ import annotations

import json
import tempfile
import textwrap
from pathlib import Path
from typing import Sequence

import numpy as np


def markdown_table(rows: list[dict], classes: Sequence[str]) -> str:
    """One row per trainer: test Dice per class and mean, validation Dice, training time, parameters."""
    header = ["trainer", *classes, "mean Dice (test)", "Dice (val, fold 0)", "train min", "params M"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row["trainer"], *(f"{row['dice'][c]:.3f}" for c in classes), f"{row['mean_dice']:.3f}",
                 f"{row['validation_dice']:.3f}", f"{row['train_seconds'] / 60:.1f}", f"{row['params_m']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def read_volume(path: Path) -> np.ndarray:
    """A NIfTI file written by `datasets.raw` or nnU-Net, as a (D, H, W) array."""
    import nibabel

    return np.asarray(nibabel.load(str(path)).dataobj).transpose(2, 1, 0)


def learning_curves(model_folder: Path) -> dict[str, list[float]]:
    """nnU-Net's per-epoch log of fold 0 (train_losses, val_losses, ema_fg_dice, ...), from checkpoint_final.pth."""
    import torch

    checkpoint = torch.load(model_folder / "fold_0" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    return checkpoint["logging"]


def most_telling_slice(label: np.ndarray) -> int:
    """The index along D of the slice showing the most classes (ties: the most foreground)."""
    scores = [(len(np.unique(s)), np.count_nonzero(s)) for s in label]
    return max(range(len(scores)), key=scores.__getitem__)


def plot(path: Path, image: np.ndarray, label: np.ndarray, predictions: dict[str, np.ndarray],
         curves: dict[str, dict[str, list[float]]], classes: Sequence[str], title: str) -> None:
    """Top: image | ground truth | each trainer's prediction on one slice. Bottom: training loss and the
    validation pseudo Dice per epoch for every trainer (nnU-Net's moving average dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    colours = plt.get_cmap("tab10").colors[:len(classes)]
    overlay = ListedColormap([(0, 0, 0, 0), *colours])
    z = most_telling_slice(label)
    panels = {"image": None, "ground truth": label, **predictions}
    figure = plt.figure(figsize=(2.3 * max(len(panels), 4), 5.4))
    grid = figure.add_gridspec(2, len(panels), height_ratios=[1.25, 1])
    for i, (name, labels) in enumerate(panels.items()):
        axis = figure.add_subplot(grid[0, i])
        axis.imshow(image[z], cmap="gray", origin="lower")
        if labels is not None:
            axis.imshow(labels[z], cmap=overlay, vmin=0, vmax=len(classes), origin="lower", interpolation="nearest")
        axis.set_title(name.removesuffix("_demo"), fontsize=8)
        axis.axis("off")
        if name == "ground truth":
            axis.legend(handles=[Patch(color=c, label=n) for n, c in zip(classes, colours)], fontsize=7,
                        loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=2, frameon=False)
    loss, dice = figure.add_subplot(grid[1, :len(panels) // 2]), figure.add_subplot(grid[1, len(panels) // 2:])
    for (name, log), colour in zip(curves.items(), plt.get_cmap("Dark2").colors):
        epochs = np.arange(1, len(log["train_losses"]) + 1)
        loss.plot(epochs, log["train_losses"], color=colour, label=name.removesuffix("_demo"))
        dice.plot(epochs, log["mean_fg_dice"], color=colour, label=name.removesuffix("_demo"))
        dice.plot(epochs, log["ema_fg_dice"], color=colour, linestyle="--", linewidth=0.8)
    loss.set(xlabel="epoch", ylabel="training loss (Dice + CE)")
    dice.set(xlabel="epoch", ylabel="validation pseudo Dice", ylim=(0, 1))
    dice.legend(fontsize=7, loc="lower right")
    figure.suptitle(textwrap.fill(title, 115), fontsize=9, x=0.01, ha="left")
    figure.tight_layout(rect=(0, 0, 1, 0.93))
    figure.savefig(path, dpi=100)
    plt.close(figure)


def write(root: Path, title: str, rows: list[dict], classes: Sequence[str], case: dict[str, Path],
          models: dict[str, Path], predictions: dict[str, Path]) -> str:
    """report.md, report.json and demo.png into `root`, staged and moved in at the end; returns the text report.

    case: {"image", "label"} files of the test case shown; models / predictions: each trainer's model folder and
    the file of its prediction of that case."""
    table = markdown_table(rows, classes)
    staging = Path(tempfile.mkdtemp(dir=root, prefix=".report."))
    plot(staging / "demo.png", read_volume(case["image"]), read_volume(case["label"]),
         {name: read_volume(file) for name, file in predictions.items()},
         {name: learning_curves(folder) for name, folder in models.items()}, classes, title)
    (staging / "report.md").write_text(f"# {title}\n\n{table}\n\n![a test case and the learning curves](demo.png)\n")
    (staging / "report.json").write_text(json.dumps({"title": title, "rows": rows}, indent=2))
    for item in staging.iterdir():
        item.replace(root / item.name)
    staging.rmdir()
    return f"{title}\n\n{table}"
