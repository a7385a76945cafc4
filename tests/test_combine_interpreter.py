"""Runs tests/test_combine.py under Triton's interpreter on the CPU, in a child
process (Triton reads TRITON_INTERPRET when it is first imported, and torch
imports it early), so that CI without a GPU checks the combine kernels' indexing: every case in
float32 (the indexing does not depend on the dtype; bfloat16 runs on CUDA), and the three
gradients' spread sums with each row layout and each launch grouping once (every pairing runs on
CUDA); merge and the backward's gathers as parts of the whole path against the float64 reference
(on CUDA also one by one), with longnet causal and groups not causal (on CUDA both ways); and every
kernel one by one on a LongNet plan whose calls hold one part or several."""

import pytest
import torch

from .child_pytest import interpreter_cannot_loop, run_tests

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA test_combine.py runs the compiled kernels")


def test_combine_kernels_in_the_triton_interpreter():
    pytest.importorskip("triton")
    if interpreter_cannot_loop():
        pytest.skip(interpreter_cannot_loop())
    pairs_left = "(spread_sums and views and one-launch) or (spread_sums and batched and per-tensor)"
    # merge and the backward's gathers run whole in the float64-reference test
    units = "pointwise_assembly or backward_blocks_match"
    # the whole path: longnet causal, groups not (each case's other causality on CUDA)
    whole_left = "float64_reference and ((longnet and full) or (groups and causal))"
    run_tests(["-k", f"not bf16 and not ({pairs_left}) and not ({units}) and not ({whole_left})",
               "tests/test_combine.py"],
              {"TRITON_INTERPRET": "1"})
