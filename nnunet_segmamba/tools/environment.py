"""`nnunet-segmamba env`: the one line that lets nnU-Net's stock commands find our trainers."""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import shlex

EXT_TRAINER_ENV = "nnUNet_extTrainer"


def trainers_folder() -> str:
    """The installed `trainers/` folder (editable or not): what nnUNet_extTrainer must list."""
    import nnunet_segmamba.trainers

    return os.path.abspath(nnunet_segmamba.trainers.__path__[0])


def hook_paths(value: str | None = None) -> list[str]:
    value = os.environ.get(EXT_TRAINER_ENV, "") if value is None else value
    return [os.path.abspath(p) for p in value.split(os.pathsep) if p.strip()]


def hook_is_set() -> bool:
    return trainers_folder() in hook_paths()


def ext_trainer_folders(*first: str) -> str:
    """A value for nnUNet_extTrainer: `first`, then our trainers folder, then the folders already listed."""
    return os.pathsep.join(dict.fromkeys([*first, trainers_folder(), *hook_paths()]))


def export_line() -> str:
    """`export nnUNet_extTrainer=...` with our folder first and any other folders already listed kept."""
    return f"export {EXT_TRAINER_ENV}={shlex.quote(ext_trainer_folders())}"


def find_trainer(name: str) -> type:
    """nnU-Net's own trainer lookup (its folder, then nnUNet_extTrainer), without its search log on stdout.

    Raises RuntimeError naming the trainer and the folders searched when it is not found. Look trainers up before any
    Mamba layer runs on CUDA: importing mamba_ssm imports transformers, whose lazily created modules change
    sys.modules while nnU-Net 2.8.1 iterates over it ("dictionary changed size during iteration").
    nnUNetv2_train and nnUNetv2_predict look their trainer up first, so they are not affected.
    """
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return recursive_find_trainer_class_by_name(name)
    except RuntimeError as error:
        if not str(error).startswith("Could not find requested nnunet trainer"):
            raise
        raise RuntimeError(f"unknown trainer {name!r}: not in nnunetv2 nor in the folders of {EXT_TRAINER_ENV} "
                           f"({os.environ.get(EXT_TRAINER_ENV, '')}); is the name right?") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Print the shell line that makes nnUNetv2_train/nnUNetv2_predict find our trainers. "
                          'Use it as: eval "$(nnunet-segmamba env)"  (or put that line in ~/.bashrc).')


def main(args: argparse.Namespace) -> int:
    print(export_line())
    return 0
