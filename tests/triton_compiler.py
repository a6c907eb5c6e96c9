"""Triton's real compiler in a CPU-only test run, where conftest.py puts triton in interpreter mode."""

import os
import subprocess
import sys
from pathlib import Path

import pytest


def compile_without_gpu(script: str) -> str:
    """Run `script` (Python that calls `triton.compile` for a GPU target) in a fresh interpreter without
    TRITON_INTERPRET, from the repository root; its stdout. Skips where this triton has no NVIDIA backend."""
    pytest.importorskip("triton.backends.nvidia.compiler")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parents[1], timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout
