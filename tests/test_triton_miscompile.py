"""Two Triton miscompiles of Inductor's code on Hopper (docs/limitations.md).

1. The block-sparse ring bug.

`tests/replay/replay.py` replays rank 1's logged forward of the
block-sparse `local_window` ring (contiguous layout, 2 ranks, 8 positions per
rank) outside the ring. One of its kernels, a persistent reduction over 8
keys (`triton_per_fused_..._3`), gives wrong scores on an H200 with Triton
3.6 when launched with XBLOCK 2, 4 or 8 and 2 or more warps, and right ones
with XBLOCK 1, 16 or 64, or XBLOCK 8 with one warp; the same code under
Triton's interpreter is right at every XBLOCK. Inductor's autotuner chooses
among XBLOCK 1, 8 and 32 by timing, which is why the ring case was right in
some processes and wrong in others.

2. The float32 `longnet` bug. `tests/replay/longnet_fp32.py`
replays the kernels Inductor generated for the float32 `longnet` spread/merge
(`dilated.assemble`) on recorded inputs. Kernel 5, a pointwise kernel that
interleaves one pattern's spread outputs (cats of padded views, 307200
elements, no mask), writes wrong values on an H200 with Triton 3.6 at XBLOCK
1024 with 4 warps, the config Inductor's autotuner picked, and right ones at
the 27 other configs tried; under the interpreter it is right. Since then a
dilated attention on CUDA runs the opaque op in float32 too, so Inductor
generates no spread/merge there.

These tests pin both down on any CUDA machine: the replay with a config that
is right on Triton 3.6 must be right; the one that is wrong there is an
expected failure, so that a fixed Triton shows as an unexpected pass.
"""

import os
import re
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

ROOT = os.path.join(os.path.dirname(__file__), "..")
REPLAY = os.path.join(ROOT, "tests", "replay", "replay.py")


def _triton_36_on_hopper() -> bool:
    if not torch.cuda.is_available():
        return False
    import triton

    return triton.__version__.startswith("3.6") and torch.cuda.get_device_capability() == (9, 0)


def replay_error(xblock: int, num_warps: int) -> float:
    """Max error of the replayed forward on the GPU with the reductions' launch config forced."""
    run = subprocess.run(
        [sys.executable, REPLAY, "--device", "cuda", "--reduction-config", str(xblock), str(num_warps)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    found = re.search(r"max error ([0-9.e+-]+|nan|inf)", run.stdout)
    assert found, run.stdout
    return float(found.group(1))


@pytest.mark.parametrize("xblock,num_warps", [(1, 2), (8, 1), (16, 2), (64, 4)])
def test_replay_right_with_configs_triton_gets_right(xblock, num_warps):
    assert replay_error(xblock, num_warps) < 1e-4


@pytest.mark.xfail(
    _triton_36_on_hopper(), strict=True,
    reason="Triton 3.6 miscompiles this persistent reduction at XBLOCK 8 with 2 warps on sm_90",
)
def test_replay_right_with_the_config_triton_gets_wrong():
    assert replay_error(8, 2) < 1e-4


LONGNET = os.path.join(ROOT, "tests", "replay", "longnet_fp32.py")


@pytest.fixture(scope="module")
def longnet_record(tmp_path_factory) -> str:
    """Every kernel's inputs and outputs of the float32 longnet replay, under the interpreter."""
    path = str(tmp_path_factory.mktemp("longnet_fp32") / "record.pt")
    run = subprocess.run(
        [sys.executable, LONGNET, "record", path], cwd=ROOT, capture_output=True, text=True,
        timeout=300, env={**os.environ, "TRITON_INTERPRET": "1"},
    )
    assert run.returncode == 0, run.stdout + run.stderr
    return path


def longnet_kernel_error(record: str, config: tuple) -> float:
    sys.path.insert(0, os.path.dirname(LONGNET))
    try:
        import longnet_fp32
    finally:
        sys.path.pop(0)
    return longnet_fp32.kernel_error(record, "5", config)


@pytest.mark.parametrize("config", [(128, 4), (512, 4), (1024, 8), (1024, 2)])
def test_longnet_kernel_right_with_configs_triton_gets_right(longnet_record, config):
    assert longnet_kernel_error(longnet_record, config) < 1e-4


@pytest.mark.xfail(
    _triton_36_on_hopper(), strict=True,
    reason="Triton 3.6 miscompiles this pointwise kernel at XBLOCK 1024 with 4 warps on sm_90",
)
def test_longnet_kernel_right_with_the_config_triton_gets_wrong(longnet_record):
    assert longnet_kernel_error(longnet_record, (1024, 4)) < 1e-4
