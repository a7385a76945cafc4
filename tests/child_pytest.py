"""Tests of this suite run in a child pytest process, for settings that must be in the
environment before torch or Triton is first imported (Triton's interpreter, Inductor's
vectorized C++)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_tests(args: list[str], env: dict[str, str], timeout: float = 600) -> str:
    """Run ``pytest -n 0 *args`` from the repository root with `env` added to this process's
    environment; fail unless it passed and skipped nothing. Returns its output."""
    res = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "0", *args],
        cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True, timeout=timeout,
    )
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    summary = res.stdout.strip().splitlines()[-1]
    assert " passed" in summary and "skipped" not in summary, res.stdout[-2000:]
    return res.stdout
