"""`nnunet-segmamba <tool>`: the command-line entry point."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from types import ModuleType

from nnunet_segmamba.tools.environment import EXT_TRAINER_ENV, ext_trainer_folders
from nnunet_segmamba.tools.errors import FAILURE, INTERRUPTED, report
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


def import_tools() -> tuple[dict[str, ModuleType], dict[str, ImportError]]:
    """Each tool's module, and the import error of each tool whose dependencies are missing or broken (the other
    tools, doctor first, still work)."""
    modules, broken = {}, {}
    for name, (module_name, _) in TOOLS.items():
        try:
            modules[name] = importlib.import_module(f"nnunet_segmamba.tools.{module_name}")
        except ImportError as error:
            broken[name] = error
    return modules, broken


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nnunet-segmamba", description=__doc__)
    subparsers = parser.add_subparsers(dest="tool", required=True, metavar="tool")
    modules, broken = import_tools()
    for name, (_, help_text) in TOOLS.items():
        subparser = subparsers.add_parser(name, help=help_text)
        if name in modules:
            modules[name].add_arguments(subparser)
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in broken:
        return report(argv[0], f"cannot start: {broken[argv[0]]} (a dependency is missing or broken; "
                               "`nnunet-segmamba doctor` checks them; `pip install .` in the nnunet-segmamba "
                               "checkout installs them again, README: Install)", FAILURE)
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
