"""Markers of this test suite, and how pytest-xdist shares it out."""

from __future__ import annotations

import os
import re

import pytest

# The tests check what compiled code computes, not how fast it runs: Inductor's C++ is scalar
# (no vector ISA: no search for loop tilings, smaller headers) and built at -O0, which compiles
# several times faster, in the compiling process (no pool of compile workers beside each
# pytest-xdist worker and each multi-process rank). Set in the environment so that the processes
# the tests start inherit it; export a variable to override. FlexAttention's CPU template needs
# the vectorized C++: its test runs in a child process with it on.
COMPILE_FAST = {
    "TORCHINDUCTOR_VEC_ISA_OK": "0",  # scalar C++
    "TORCHINDUCTOR_DEBUG_COMPILE": "1",  # g++ -O0
    "TORCHINDUCTOR_COMPILE_THREADS": "1",
}
for _name, _value in COMPILE_FAST.items():
    os.environ.setdefault(_name, _value)

# Most tests check what the rewrite computes: the backend runs the rewritten graph as Dynamo
# captured it (`compiler: eager`; the attention functions with their own autograd, a few seconds
# of compile where AOTAutograd takes several times that on CPU). Tests marked `inductor` check what
# Inductor builds from it (through AOTAutograd), as users do; so do the benchmarks.
# `DILATED_COMPILER=aot_eager` or `=inductor python -m pytest` runs every test through that compiler.
COMPILER_ENV = "DILATED_COMPILER"
os.environ.setdefault(COMPILER_ENV, "eager")


# modules whose every test is about what Inductor builds (GPU kernels)
INDUCTOR_MODULES = {"test_gpu.py", "test_worklist_gpu.py", "test_block_sparse_gpu.py",
                    "test_triton_miscompile.py", "test_ring_nccl.py"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.name in INDUCTOR_MODULES:
            item.add_marker(pytest.mark.inductor)


@pytest.fixture(autouse=True)
def _compiler_of_the_test(request, monkeypatch):
    """Tests marked `inductor` compile with Inductor whatever the suite's compiler."""
    if request.node.get_closest_marker("inductor"):
        monkeypatch.setenv(COMPILER_ENV, "inductor")

# Tests that read one expensive launch kept in their module (the multi-process runs; the quick
# benchmark's runs; a recorded kernel replay), by the nodeid prefix the tests of one launch share,
# and the set the launch belongs to. pytest-xdist runs each set in one worker, so each launch runs
# once. The multi-process launches (rings of every world size, FSDP2 x ring meshes) are one set,
# one launch at a time: two at once would split the cores between their ranks, and each launch's
# bound on hangs assumes it has them.
SHARED_LAUNCHES = {
    re.compile(r"tests/test_ring\.py::test_ring_case\["): "multi-process",
    re.compile(r"tests/test_fsdp_ring\.py::test_fsdp_ring_case\["): "multi-process",
    re.compile(r"tests/test_ring_nccl\.py::test_ring_nccl_case\["): "nccl",
    re.compile(r"tests/test_bench_quick\.py::"): "bench-quick",
    re.compile(r"tests/test_triton_miscompile\.py::"): "triton-replay",
}


def shared_launch(nodeid: str) -> str | None:
    """The set of launches whose results the test `nodeid` reads, or None."""
    return next((name for prefix, name in SHARED_LAUNCHES.items() if prefix.match(nodeid)), None)


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "inductor: compiles with Inductor (the backend's default) while the rest of the "
        "suite runs the rewritten graph as captured (compiler eager)",
    )
    config.addinivalue_line(
        "markers", "compiles: a multi-process ring case that runs torch.compile (the slow ones; "
        "deselect with -m 'not compiles')",
    )


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """Under `-n N` with the default `--dist load`: each test is its own unit of work, but the
    tests of one shared launch are one unit; units with more tests start first."""
    if config.getvalue("dist") != "load":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class SharedLaunchScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return shared_launch(nodeid) or nodeid

    return SharedLaunchScheduling(config, log)
