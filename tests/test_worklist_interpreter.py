"""Runs tests/test_worklist.py under Triton's interpreter on the CPU, in a child
process (Triton reads TRITON_INTERPRET when it is first imported, and torch
imports it early), so that CI without a GPU checks the work-list kernels'
indexing and math."""

import pytest
import torch

from .child_pytest import interpreter_cannot_loop, run_tests

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA test_worklist.py runs the compiled kernels")


def test_worklist_kernels_in_the_triton_interpreter():
    pytest.importorskip("triton")
    if interpreter_cannot_loop():
        pytest.skip(interpreter_cannot_loop())
    run_tests(["tests/test_worklist.py"], {"TRITON_INTERPRET": "1"})
