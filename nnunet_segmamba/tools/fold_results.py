"""A trained fold's results apart from its checkpoints: kept, packed into one archive, merged into nnUNet_results.

A fold's results are what `compare` and a reader need, a few kB to a few hundred kB: nnU-Net's validation summary,
training logs, progress plot and debug.json, with the plans.json, dataset.json and dataset_fingerprint.json of the
model folder above it. Checkpoints and validation predictions are not results (hundreds of MB for a 3d_fullres
fold). `sweep --keep results` prunes each fold it trains to its results; archives carry them between machines, and
`merge_results` adds them to an `nnUNet_results` (or any folder laid out like it) without overwriting anything it
holds: results from another machine merge into the same table, results of other data or other plans are refused.

Layout (relative to nnUNet_results): `DatasetXXX_Name/TRAINER__PLANS__CONFIGURATION/fold_K/...`, and optionally
`DatasetXXX_Name/training_data.json`, the fingerprint of the data the dataset's folds were trained on
(`data_fingerprint`).
"""

from __future__ import annotations

import fnmatch
import gzip
import hashlib
import json
import os
import tarfile
from pathlib import Path, PurePosixPath
from typing import Iterator

FOLD_RESULTS = ("validation/summary.json", "training_log_*.txt", "progress.png", "debug.json")
"""A fold folder's result files (glob patterns relative to it); everything else there is checkpoints and
predictions."""
MODEL_RESULTS = ("plans.json", "dataset.json", "dataset_fingerprint.json")
"""A model folder's files that its folds' results need: the plans and labels they were trained with."""
DATA_FINGERPRINT = "training_data.json"
"""In a dataset's results folder: {"sha256": ...} of the data its folds were trained on."""
KEEP_ALSO = (".nnunet_segmamba_sweep.lock",)
"""Not results, but never deleted from a fold folder: the sweep's fold lock (another process may hold it)."""


class MergeError(Exception):
    """Results that must not be merged (other data, other plans, a fold already holding other results), or an
    archive that is not a results archive; nothing was written."""


def is_result(relative: PurePosixPath) -> bool:
    """Whether a path relative to nnUNet_results is a result file (in the layout above)."""
    parts = relative.parts
    if len(parts) == 2:
        return parts[1] == DATA_FINGERPRINT
    if len(parts) == 3:
        return parts[2] in MODEL_RESULTS
    return len(parts) >= 4 and parts[2].startswith("fold_") and any(
        fnmatch.fnmatch("/".join(parts[3:]), pattern) for pattern in FOLD_RESULTS)


def keep_results(fold: Path) -> int:
    """Delete everything in a finished fold folder that is not a result (checkpoints, validation predictions);
    the bytes freed."""
    freed = 0
    for path in sorted(fold.rglob("*"), reverse=True):  # files before the folders holding them
        relative = path.relative_to(fold).as_posix()
        if path.is_dir():
            if not any(path.iterdir()):
                path.rmdir()
        elif relative not in KEEP_ALSO and not any(fnmatch.fnmatch(relative, p) for p in FOLD_RESULTS):
            freed += path.stat().st_size
            path.unlink()
    return freed


def read_summary(fold: Path) -> dict | None:
    """The fold's validation/summary.json as nnU-Net wrote it; None where there is none, or where it is incomplete
    (nnU-Net writes it in place: a training stopped while writing it leaves an empty or cut-off file)."""
    try:
        summary = json.loads((fold / "validation" / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    return summary if isinstance(summary, dict) else None


def fold_has_results(fold: Path) -> bool:
    """Whether the fold was validated to the end: a complete validation summary (`read_summary`)."""
    return read_summary(fold) is not None


def result_files(root: Path, folds: list[Path], plots: bool = True) -> list[Path]:
    """The result files of `folds` (fold folders under `root` with a validation summary), their model folders'
    files and their datasets' fingerprints, relative to `root`; without progress.png unless `plots`."""
    files: set[Path] = set()
    for fold in folds:
        if not fold_has_results(fold):
            continue
        for path in [*fold.rglob("*"), *fold.parent.iterdir(), *fold.parents[1].iterdir()]:
            relative = path.relative_to(root)
            if path.is_file() and is_result(PurePosixPath(relative.as_posix())) and (plots or path.name !=
                                                                                    "progress.png"):
                files.add(relative)
    return sorted(files)


def pack(root: Path, folds: list[Path], archive: Path, plots: bool = True) -> int:
    """Write the results of `folds` (see `result_files`) as a .tar.gz at `archive`, atomically (a reader never
    sees half an archive); the number of folds packed."""
    files = result_files(root, folds, plots)
    partial = archive.with_name(f".{archive.name}.{os.getpid()}.partial")
    with tarfile.open(partial, "w:gz") as tar:
        for relative in files:
            tar.add(root / relative, arcname=relative.as_posix(), recursive=False)
    os.replace(partial, archive)
    return sum(1 for relative in files if relative.as_posix().endswith("validation/summary.json"))


def _archive_files(archive: Path) -> Iterator[tuple[PurePosixPath, bytes]]:
    with tarfile.open(archive, "r:*") as tar:
        for member in tar:
            if member.isdir():
                continue
            relative = PurePosixPath(member.name)
            if not member.isfile() or relative.is_absolute() or ".." in relative.parts or not is_result(relative):
                raise MergeError(f"{archive} is not a results archive: it holds {member.name}")
            yield relative, tar.extractfile(member).read()


def _folder_files(folder: Path) -> Iterator[tuple[PurePosixPath, bytes]]:
    for path in sorted(folder.rglob("*")):
        relative = PurePosixPath(path.relative_to(folder).as_posix())
        if path.is_file() and is_result(relative):
            yield relative, path.read_bytes()


def read_results(source: Path) -> dict[PurePosixPath, bytes]:
    """The result files of an archive (.tar.gz, everything in it must be a result) or of a folder laid out as
    nnUNet_results (other files there are ignored), by path relative to it."""
    if source.is_dir():
        return dict(_folder_files(source))
    try:
        return dict(_archive_files(source))
    except (tarfile.TarError, OSError, EOFError) as error:
        raise MergeError(f"cannot read {source} as a results archive (.tar.gz): {error}") from None


def _conflict(relative: PurePosixPath, target: Path) -> str:
    parts = relative.parts
    if parts[-1] == DATA_FINGERPRINT:
        return (f"{parts[0]}: its results were trained on other data than those in {target} (the fingerprints of "
                f"{DATA_FINGERPRINT} differ): generate the same data, or merge into another folder")
    if len(parts) == 3:
        return f"{parts[0]}/{parts[1]}: its {parts[2]} differs from the one in {target} (other plans or labels)"
    return f"{'/'.join(parts[:3])} already holds other results in {target} ({'/'.join(parts[3:])} differs)"


def merge_results(source: Path, target: Path) -> list[str]:
    """Add the results of `source` (archive or folder) to the folder `target`: files it lacks are written,
    identical ones skipped. Refuses (MergeError, nothing written) where a fold's summary, a model's plans or
    dataset.json, or a dataset's data fingerprint differ from what `target` holds. The folds added, as
    'Dataset/model/fold_K'."""
    files = read_results(source)
    if not any(p.as_posix().endswith("validation/summary.json") for p in files):
        raise MergeError(f"{source} holds no fold results (no fold_*/validation/summary.json)")
    for relative, content in files.items():
        existing = target / relative
        conflicts = relative.name in ("summary.json", DATA_FINGERPRINT, "plans.json", "dataset.json")
        if conflicts and existing.is_file() and existing.read_bytes() != content:
            raise MergeError(_conflict(relative, target))
    added = []
    for relative, content in files.items():
        existing = target / relative
        if existing.is_file():
            continue
        existing.parent.mkdir(parents=True, exist_ok=True)
        partial = existing.with_name(f".{existing.name}.partial")
        partial.write_bytes(content)
        os.replace(partial, existing)
        if relative.as_posix().endswith("validation/summary.json"):
            added.append("/".join(relative.parts[:3]))
    return sorted(added)


def _nifti_bytes(path: Path) -> bytes:
    """A file's content, gzip-decompressed for .gz (the compressed bytes hold a time stamp)."""
    return gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()


def data_fingerprint(raw: Path, preprocessed: Path, plans: str = "nnUNetPlans") -> str:
    """sha256 of what a dataset's folds are trained on: its raw training images and labels (contents), its
    dataset.json, the plans and the cross-validation splits (splits_final.json) of its preprocessed folder."""
    digest = hashlib.sha256()
    raw_files = sorted([raw / "dataset.json", *(raw / "imagesTr").iterdir(), *(raw / "labelsTr").iterdir()])
    entries = [(path.relative_to(raw).as_posix(), path) for path in raw_files]
    entries += [(name, preprocessed / name) for name in (f"{plans}.json", "splits_final.json")]
    for name, path in entries:
        content = _nifti_bytes(path)
        if path.suffix == ".json":  # key order and indentation are not data
            content = json.dumps(json.loads(content), sort_keys=True).encode()
        digest.update(name.encode() + hashlib.sha256(content).digest())
    return digest.hexdigest()


def write_data_fingerprint(results: Path, dataset: str, fingerprint: str) -> None:
    """Record in `results/dataset/` the data its folds are trained on."""
    (results / dataset).mkdir(parents=True, exist_ok=True)
    (results / dataset / DATA_FINGERPRINT).write_text(json.dumps({"sha256": fingerprint}) + "\n")

