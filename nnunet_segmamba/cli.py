"""`nnunet-segmamba <tool>`: the command-line entry point."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from nnunet_segmamba.tools.environment import EXT_TRAINER_ENV, ext_trainer_folders
from nnunet_segmamba.tools.errors import INTERRUPTED, report
from nnunet_segmamba.tools.processes import stop_signals_interrupt

TOOLS = {
    "demo": ("demo", "the whole product on generated data, in a workspace of its own (the main job)"),
    "env": ("environment", "print the nnUNet_extTrainer line for nnU-Net's stock commands"),
    "doctor": ("doctor", "check the installation, GPU, scan backend and nnU-Net set-up"),
    "compare": ("compare", "compare trainers' nnU-Net results across datasets (tables, tests, plots)"),
    "sweep": ("sweep", "train trainers x datasets x folds (local or Slurm, resumable), then compare them"),
    "synth": ("synth", "write a generated nnU-Net raw dataset"),
    "plan": ("plan", "plan patch and batch sizes that fit our network in a GPU memory target"),
    "benchmark": ("benchmark", "time and size trainers' networks at a plans configuration"),
    "benchmark-scan": ("scan_benchmark", "compare the scan backends (errors, times)"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nnunet-segmamba", description=__doc__)
    subparsers = parser.add_subparsers(dest="tool", required=True, metavar="tool")
    modules = {}
    for name, (module_name, help_text) in TOOLS.items():
        modules[name] = importlib.import_module(f"nnunet_segmamba.tools.{module_name}")
        modules[name].add_arguments(subparsers.add_parser(name, help=help_text))
    args = parser.parse_args(argv)
    if args.tool != "doctor":  # doctor reports the user's own setting
        # nnU-Net's trainer lookups in this process find our trainers whatever the user's shell has
        os.environ[EXT_TRAINER_ENV] = ext_trainer_folders()
    with stop_signals_interrupt():  # SIGTERM and SIGHUP stop a tool as Ctrl-C does: its children end with it
        try:
            return modules[args.tool].main(args)
        except KeyboardInterrupt:
            return report(args.tool, "interrupted", INTERRUPTED)


if __name__ == "__main__":
    sys.exit(main())
