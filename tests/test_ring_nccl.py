"""Ring attention across real processes on GPUs (NCCL), docs/spec.md "Ring attention".

The multi-process cases of `tests/test_ring.py`, run over NCCL with CUDA
tensors: rank R uses cuda:R (every rank sees all GPUs), for world sizes
2 .. min(4, GPU count). The worker (`tests/ring_worker.py --backend nccl`)
runs every gloo case and more: bfloat16 for every inner attention (dense,
dilated including segments that span ranks, block-sparse), layout and
causality, where cuDNN/flash compute the dense blocks; a few float16 ones;
bfloat16 through the backend. Output and q/k/v gradients on every rank are
checked against the float64 reference on the full sequence (on the CPU),
with the tolerance rule of `tests/tolerance.py`.

Each world size starts its ranks twice: once for the cases that do not
compile, once for those that do (marked `compiles`, the slow part;
``-m "not compiles"`` skips them and their launch). Each case is one test,
failing if the case failed on any rank; a hang is bounded (the launcher's
timeout, and NCCL's watchdog aborts a collective that waits past the
worker's 60 s process-group timeout).

Skipped unless at least 2 CUDA devices and NCCL are available.

    python -m pytest -q tests/test_ring_nccl.py
"""

from __future__ import annotations

import os
import time

import pytest
import torch
import torch.distributed as dist

from . import ring_worker
from .test_ring import case_failures, launch

GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
READY = GPUS >= 2 and dist.is_available() and dist.is_nccl_available()
WORLDS = tuple(range(2, max(2, min(4, GPUS)) + 1))  # (2,) where skipped: the cases still show
# bounds on hangs (s) of a launch, by whether it runs the compiling cases; a normal run of the
# 2-GPU file takes a fraction of them
TIMEOUT_S = {False: 240, True: 420}  # by `compiles`

pytestmark = pytest.mark.skipif(not READY, reason=f"needs 2 or more CUDA GPUs and NCCL ({GPUS} GPUs)")

_RUNS: dict[tuple[int, bool], dict] = {}


def fresh_caches(tmp: str) -> dict[str, str]:
    """Inductor's and Triton's cache folders under `tmp`: a launch reuses nothing an earlier one
    compiled or autotuned (a config chosen once is cached on disk, so the bad pick of the
    known bug below was reused by later launches)."""
    return {"TORCHINDUCTOR_CACHE_DIR": os.path.join(tmp, "inductor"), "TRITON_CACHE_DIR": os.path.join(tmp, "triton")}


def _run(world: int, compiled: bool, tmp_path_factory) -> dict:
    """The worker's results for the (non-)compiling cases of `world` ranks, launched once."""
    key = (world, compiled)
    if key not in _RUNS:
        only = [name for name in ring_worker.cases(world, "nccl") if ring_worker.compiles(name) == compiled]
        tmp = str(tmp_path_factory.mktemp(f"ring_nccl{world}{'_compiled' if compiled else ''}"))
        _RUNS[key] = launch(
            world, tmp, only=only, timeout=TIMEOUT_S[compiled], backend="nccl", env=fresh_caches(tmp)
        )
    return _RUNS[key]


def _params():
    out = []
    for world in WORLDS:
        for name in ring_worker.cases(world, "nccl"):
            marks = [pytest.mark.compiles] if ring_worker.compiles(name) else []
            out.append(pytest.param(world, name, marks=marks, id=f"w{world}-{name}"))
    return out


@pytest.mark.parametrize("world,case", _params())
def test_ring_nccl_case(world, case, tmp_path_factory):
    run = _run(world, ring_worker.compiles(case), tmp_path_factory)
    failures = case_failures(run, world, case)
    assert not failures, f"{case} on {world} ranks (NCCL) failed:\n" + "\n".join(failures)


def test_nccl_launcher_kills_and_reports_a_hang(tmp_path):
    """A rank whose peer never starts is killed and reported, over NCCL too."""
    start = time.monotonic()
    run = launch(2, str(tmp_path), only=["bad-zigzag-odd"], timeout=10, ranks=[0], backend="nccl")
    assert time.monotonic() - start < 45
    assert run["failure"] is not None and "still running" in run["failure"]
    assert run["results"][0] == {}
