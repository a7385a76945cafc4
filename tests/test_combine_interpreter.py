"""Runs tests/test_combine.py under Triton's interpreter on the CPU, in a child
process (Triton reads TRITON_INTERPRET when it is first imported, and torch
imports it early), so that CI without a GPU checks the combine kernels' indexing: every case in
float32 (the indexing does not depend on the dtype; bfloat16 runs on CUDA)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA test_combine.py runs the compiled kernels")


def test_combine_kernels_in_the_triton_interpreter():
    pytest.importorskip("triton")
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    res = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "0", "-k", "not bf16",
         "tests/test_combine.py"],
        cwd=root, env=env, capture_output=True, text=True, timeout=600,
    )
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    assert " passed" in res.stdout and "skipped" not in res.stdout.splitlines()[-1], res.stdout[-2000:]
