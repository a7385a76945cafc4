"""FSDP2 x ring training of HF causal LMs on a 2-D DeviceMesh, across real processes (gloo on CPU).

4 ranks run phase ``train`` on both mesh shapes in turn (2 x 2 as dp x cp,
then cp = 4; one process group holds both meshes), and 4 new ranks phase
``resume`` on the shapes that have resumed cases (`tests/fsdp_ring_worker.py`,
models in `tests/fsdp_ring_models.py`): phase
``train`` runs every case of the shape (three AdamW steps of a tiny HF model
compiled with backend="dilated", a ring rule on ``mesh["cp"]``, FSDP2 over
dp x cp, activation checkpointing; losses, gradients and parameters against
single-process training with float64 reference attention; a DCP checkpoint
after step 2; ring sites that cannot be rewritten raising on every rank);
phase ``resume`` starts new processes that load a checkpoint and redo step 3,
which must equal the uninterrupted run exactly. On 2 x 2: a Qwen2 whose
layers mix a sliding window and full causal attention (dense inner: the
window kept under the ring), resumed; on cp = 4: a Llama with dilated inner
attention, a Mistral whose every layer has a sliding window (dense inner), and
a dilated rule on the Qwen2's window layer raising. Each case
is one test here. The ranks compile the rewritten graphs with the suite's compiler
(`DILATED_COMPILER`: eager, the rewritten graph as captured, unless set;
`DILATED_COMPILER=inductor` trains through Inductor, as `examples/train_fsdp_ring.py` does). A run is bounded: on timeout the ranks
are killed and the cases fail with where each rank was.
"""

from __future__ import annotations

import os

import pytest
import torch

from . import fsdp_ring_worker
from .launcher import case_failures, launch_ranks

pytest.importorskip("transformers")

WORLD = 4
MESHES = {fsdp_ring_worker.mesh_name(WORLD, dp): dp for dp in (2, 1)}  # name -> dp (cp = WORLD / dp)
# bounds on hangs, with room for a 2-core box where the ranks compile with cold Inductor caches
TIMEOUT_S = {"train": 900, "resume": 600}

# transformers passes its causal mask as a graph input when compiling on torch < 2.13: the sites
# are left, which a ring rule makes an error (docs/limitations.md)
pytestmark = pytest.mark.skipif(
    tuple(int(x) for x in torch.__version__.split(".")[:2]) < (2, 13),
    reason="transformers passes its causal mask as a graph input on torch < 2.13",
)

_RUNS: dict[str, dict] = {}  # by phase


def launch(phase: str, dps: list[int], out: str, ckpt: str, timeout: float) -> dict:
    """Run the worker's `phase` on WORLD ranks, on the meshes of `dps` in turn (`launcher.launch_ranks`)."""
    args = ["--dp", *map(str, dps), "--store", os.path.join(out, "store"), "--out", out, "--ckpt", ckpt,
            "--phase", phase]
    return launch_ranks("tests.fsdp_ring_worker", WORLD, out, args, timeout)


def _meshes(phase: str) -> list[int]:
    """The dp of each mesh that has cases in `phase`."""
    return [dp for dp in MESHES.values() if fsdp_ring_worker.cases(WORLD, dp, phase)]


def _run(phase: str, tmp_path_factory) -> dict:
    """One launch per phase, every mesh in it; phase "resume" starts new processes that load the
    checkpoints phase "train" saved."""
    if phase == "resume":
        _run("train", tmp_path_factory)
    if phase not in _RUNS:
        base = tmp_path_factory.getbasetemp() / "fsdp-ring"
        _RUNS[phase] = launch(phase, _meshes(phase), str(base / phase), str(base / "ckpt"), TIMEOUT_S[phase])
    return _RUNS[phase]


def _case_ids():
    return [(phase, f"{mesh}-{name}") for phase in ("train", "resume") for mesh, dp in MESHES.items()
            for name in fsdp_ring_worker.cases(WORLD, dp, phase)]


@pytest.mark.parametrize("phase,case", _case_ids(), ids=[c for _, c in _case_ids()])
def test_fsdp_ring_case(phase, case, tmp_path_factory):
    run = _run(phase, tmp_path_factory)
    failures = case_failures(run, WORLD, case)
    assert not failures, f"{case} failed:\n" + "\n".join(failures)
