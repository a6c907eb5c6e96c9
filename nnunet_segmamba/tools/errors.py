"""How every `nnunet-segmamba` command reports a problem: one line on stderr that names the command and says what
to do (results go to stdout), and its exit code."""

from __future__ import annotations

import sys

USAGE = 2
"""Bad arguments or set-up, found before any work (argparse's code for its own usage errors)."""
FAILURE = 1
"""The work itself failed."""
INTERRUPTED = 130
"""Stopped by Ctrl-C or SIGTERM (the shell's code for SIGINT)."""


def report(tool: str, message: str, code: int = USAGE) -> int:
    """Prints `nnunet-segmamba TOOL: error: MESSAGE` to stderr; returns `code` for main to return."""
    print(f"nnunet-segmamba {tool}: error: {message}", file=sys.stderr, flush=True)
    return code

