"""The combine kernels keep their 16-byte loads and stores when compiled for a GPU.

`benchmarks/bench_kernel_compile.py` compiles every Triton kernel of a
dilated site's gathered-block path for sm_90 (H100, H200) on the CPU, as
Triton's JIT would on the GPU, and counts each kernel's 16-byte global loads
and stores in its PTX. Rows of head dim 128 in bf16 are 256 contiguous bytes:
a kernel that moves them without a single 16-byte access has lost the
alignment its offsets must carry (as with Triton 3.6, which drops a hint put
on an inlined call's result) and moves them two bytes at a time."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_combine_kernels_compile_to_16_byte_accesses(tmp_path):
    pytest.importorskip("triton")
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "bench_kernel_compile.py"), "--out", str(tmp_path),
           "--lengths", "8192", "--splits", "longnet", "groups", "--paths", "gathered blocks"]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    with open(tmp_path / "kernel_compile.json") as f:
        rows = json.load(f)["rows"]
    # per plan: the forward's gather and merge, the backward's gathers and spread
    assert [r["kernel"] for r in rows] == ["gather_kernel", "combine_kernel"] * 4
    for r in rows:
        where = f"{r['kernel']} ({r['split']})"
        assert r["vector_loads"] > 0 and r["vector_stores"] > 0, where
