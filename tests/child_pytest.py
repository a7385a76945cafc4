"""Tests of this suite run in a child pytest process, for settings that must be in the
environment before torch or Triton is first imported (Triton's interpreter, Inductor's
vectorized C++)."""

from __future__ import annotations

import functools
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


# A kernel with a loop over a run-time bound, run in Triton's interpreter.
_LOOP_PROBE = """
import torch, triton, triton.language as tl

@triton.jit
def total(x, n):
    acc = 0.0
    for i in range(n):
        acc += tl.load(x + i)
    tl.store(x, acc)

x = torch.ones(3)
total[(1,)](x, 3)
assert x[0].item() == 3.0, x
"""


@functools.lru_cache(maxsize=1)
def interpreter_cannot_loop() -> str | None:
    """Why Triton's interpreter cannot run this package's kernels here, or None when it can.

    Triton 3.6's interpreter fails on any loop over a run-time bound with numpy 2.4
    ("only 0-dimensional arrays can be converted to Python scalars"); the combine and
    work-list kernels loop so."""
    res = subprocess.run([sys.executable, "-c", _LOOP_PROBE], cwd=ROOT, capture_output=True, text=True,
                         timeout=300, env={**os.environ, "TRITON_INTERPRET": "1"})
    if res.returncode == 0:
        return None
    versions = subprocess.run(
        [sys.executable, "-c", "import numpy, triton; print(f'Triton {triton.__version__}, numpy {numpy.__version__}')"],
        capture_output=True, text=True, timeout=300,
    ).stdout.strip()
    return f"{versions}: the interpreter cannot run a loop over a run-time bound ({res.stderr.strip().splitlines()[-1]})"
