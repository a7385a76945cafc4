"""The dilated op's Triton kernels compile in Inductor's compile workers, under the
keys its first launches look up (`lowering/common/precompile.py`).

On the CPU: for each call signature, the launches that `worklist.forward_launches`
/ `backward_launches` and `compute.gathered_launches` list are specialised by
Triton's JIT exactly as the real call's launches are (compared through Triton's ``jit_cache_hook``, with the
target an sm_90 GPU); and a compile submitted to Inductor's real worker pool
fills the Triton cache a later compile then hits. On CUDA: compiling and
training a module hands its kernels to the workers, and every compile of them
in the step finds the cache filled."""

import json
import os
import subprocess
import sys

import pytest
import torch

from dilated_compile.lowering.common import precompile
from dilated_compile.lowering.common.storage import seq_major_empty
from dilated_compile.lowering.dilated import compute
from dilated_compile.lowering.dilated import plan as plans
from dilated_compile.lowering.dilated import worklist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

triton = pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") == "1":
    pytest.skip("Triton's interpreter compiles nothing", allow_module_level=True)

from triton import knobs  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver  # noqa: E402

SM90 = GPUTarget("cuda", 90, 32)


class _Specialisations:
    """Triton's JIT hook that records what each launch is specialised on (and compiles nothing)."""

    def __init__(self):
        self.seen: list[tuple[str, str]] = []

    def __call__(self, *, key, repr, fn, compile, is_manual_warmup, already_compiled):
        self.seen.append((fn.name, compile["specialization_data"]))
        return True  # skip the compile

    def take(self) -> list[tuple[str, str]]:
        seen, self.seen = self.seen, []
        return seen


@pytest.fixture
def specialisations(monkeypatch):
    hook = _Specialisations()
    monkeypatch.setattr(knobs.runtime, "jit_cache_hook", hook)
    monkeypatch.setattr(driver, "_active", precompile._TargetOnly(SM90))
    return hook


def _kernel_names(plan, causal: bool) -> tuple[list[str], list[str]]:
    """The work list's kernels of `plan`, forward and backward, in launch order."""
    forward, backward = ["forward_kernel"], ["prepare_kernel", "backward_kernel"]
    if plan.head_split == "longnet":
        forward, backward = ["forward_kernel", "merge_kernel"], ["prepare_kernel", "backward_kernel", "cast_kernel"]
    if worklist.runs_as_union(plan, causal, backward=False):
        forward = ["union_forward_kernel"]
    if worklist.runs_as_union(plan, causal, backward=True):
        backward = ["prepare_kernel", "union_backward_kernel"]
    return forward, backward


# (heads, length, segments, rates): a length no segment divides; one shorter than the
# largest segment; heads that the patterns split unevenly
CASES = [(4, 1000, (256, 512), (1, 2)), (3, 300, (128, 512), (2, 4)), (5, 512, (64, 128, 256), (1, 2, 4))]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("head_split", ["groups", "longnet"])
@pytest.mark.parametrize("case", CASES, ids=["n1000", "n300", "h5"])
def test_listed_launches_are_specialised_like_the_first_call(specialisations, case, head_split, is_causal,
                                                            dtype):
    h, n, seg, rates = case
    plan = plans.make_plan(h, n, seg, rates, head_split, plans.SMALL_PART_TILES, 132)
    q, k, v = (torch.randn(1, n, h, 64, dtype=dtype).transpose(1, 2) for _ in range(3))

    for launch in worklist.forward_launches(plan, is_causal, q, k, v):
        precompile.compile_launch(SM90, (), launch)
    listed = specialisations.take()
    out, lse = worklist.forward(plan, is_causal, 0.125, q, k, v)
    called = specialisations.take()
    expected, expected_backward = _kernel_names(plan, is_causal)
    assert [name for name, _ in listed] == expected
    assert listed == called

    dout = seq_major_empty(q, q.shape, q.dtype)
    for launch in worklist.backward_launches(plan, is_causal, q, k, v, out, lse, dout):
        precompile.compile_launch(SM90, (), launch)
    listed = specialisations.take()
    worklist.backward(plan, is_causal, 0.125, q, k, v, out, lse, dout)
    called = specialisations.take()
    assert [name for name, _ in listed] == expected_backward
    assert listed == called


@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("head_split", ["groups", "longnet"])
@pytest.mark.parametrize("small_tiles", [plans.SMALL_PART_TILES, 0], ids=["batched", "views"])
@pytest.mark.parametrize("case", CASES, ids=["n1000", "n300", "h5"])
def test_listed_combine_launches_are_specialised_like_the_first_call(specialisations, case, small_tiles,
                                                                    head_split, is_causal):
    """The gathered blocks' combine kernels (gather, merge, spread), listed by running
    the path with launches recorded, against the path run for real."""
    h, n, seg, rates = case
    plan = plans.make_plan(h, n, seg, rates, head_split, small_tiles, 132)
    q, k, v = (torch.randn(1, n, h, 64, dtype=torch.bfloat16).transpose(1, 2) for _ in range(3))

    def listed_and_called(tensors: tuple, run) -> tuple[list, list]:
        for launch in compute.gathered_launches(plan, is_causal, 0.125, tensors):
            precompile.compile_launch(SM90, (), launch)
        listed = specialisations.take()
        result = run(plan, is_causal, 0.125, *tensors)
        return listed, specialisations.take(), result

    listed, called, (out, lse) = listed_and_called((q, k, v), compute.gathered_forward)
    assert [name for name, _ in listed][-1] == "combine_kernel"
    assert listed == called
    dout = seq_major_empty(q, q.shape, q.dtype)
    listed, called, _ = listed_and_called((q, k, v, out, lse, dout), compute.gathered_backward)
    assert [name for name, _ in listed][-2:] == ["gather_kernel", "combine_kernel"]
    assert listed == called


@pytest.mark.parametrize("head_split", ["groups", "longnet"])
def test_tracing_the_op_hands_over_each_signatures_launches_once(monkeypatch, head_split):
    """The op's fake implementations (what tracing runs, several times per site) hand the
    launches of the work list's first real call to `precompile.submit`, once per call
    signature. Fake CUDA tensors, no GPU: the workers' side and the device's target are
    stood in for (`ready`, `submit`). (The gathered blocks' fake path needs a CUDA build
    of torch: the test on CUDA below covers it.)"""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from dilated_compile.lowering.dilated import op
    from dilated_compile.lowering.dilated.arguments import encode_parameters

    monkeypatch.setenv("DILATED_WORKLIST", "on")
    handed: list[list[str]] = []
    monkeypatch.setattr(precompile, "ready", lambda device: True)
    monkeypatch.setattr(precompile, "submit",
                        lambda device, launches: handed.append([x.name for x in launches]) or True)
    monkeypatch.setattr(op, "_LISTED", {})
    pattern = encode_parameters((256, 512), (1, 2), head_split)
    with FakeTensorMode():
        q, k, v = (torch.empty(1, 1000, 4, 64, dtype=torch.bfloat16, device="cuda").transpose(1, 2)
                   for _ in range(3))
        for _ in range(2):
            out, lse = torch.ops.dilated_compile.dilated_attention(q, k, v, pattern, True, 0.125, 0)
            torch.ops.dilated_compile.dilated_attention_backward(out, q, k, v, out, lse, pattern, True, 0.125, 0)
    assert handed == list(_kernel_names(plans.make_plan(4, 1000, (256, 512), (1, 2), head_split), True))


def test_a_misaligned_tensor_is_specialised_otherwise(specialisations):
    """The listed launches take tensors as 16-byte aligned; a view that is not compiles
    at its first call (the check above would miss a listing that ignored alignment)."""
    plan = plans.make_plan(4, 512, (256, 512), (1, 2), "groups", plans.SMALL_PART_TILES, 132)
    q = torch.randn(1, 512 * 4 * 64 + 1, dtype=torch.bfloat16)[:, 1:].view(1, 512, 4, 64).transpose(1, 2)
    for launch in worklist.forward_launches(plan, False, q, q, q):
        precompile.compile_launch(SM90, (), launch)
    listed = specialisations.take()
    worklist.forward(plan, False, 0.125, q, q, q)
    assert listed != specialisations.take()


def test_a_compile_worker_fills_the_cache_a_later_compile_hits(tmp_path, monkeypatch):
    """Through Inductor's real worker pool: the worker writes the kernel's binary for
    sm_90 into the given Triton cache; compiling the same launch again in this process
    finds it there and writes nothing (the worker's own environment, which names
    torch's ptxas where torch has one, is set aside for the compile)."""
    import torch._inductor.config as inductor_config
    from torch._inductor.async_compile import AsyncCompile

    plan = plans.make_plan(4, 1000, (256, 512), (1, 2), "groups", plans.SMALL_PART_TILES, 132)
    q = torch.randn(1, 1000, 4, 64, dtype=torch.bfloat16).transpose(1, 2)
    (launch,) = worklist.forward_launches(plan, True, q, q, q)
    env = (("TRITON_CACHE_DIR", str(tmp_path)),)
    with inductor_config.patch(compile_threads=2):  # the suite's own compiles use none
        job = AsyncCompile.process_pool().submit(precompile.compile_launch, SM90, env, launch)
        assert job.result(timeout=300) > 0
    entries = sorted(os.listdir(tmp_path))
    assert len(entries) == 1 and "forward_kernel.cubin" in os.listdir(tmp_path / entries[0])

    hits = []
    monkeypatch.setattr(knobs.compilation, "listener", lambda **kw: hits.append(kw["cache_hit"]))
    precompile.compile_launch(SM90, env, launch)
    assert hits == [True]
    assert sorted(os.listdir(tmp_path)) == entries


def test_the_benchmark_counts_the_cold_steps_compiles_and_cache_hits(tmp_path):
    """`benchmarks/gpt_train_measure.package_compiles`, which the end-to-end benchmark's
    rows report, sees a compile of a package kernel as a miss, then the same as a hit."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from gpt_train_measure import package_compiles

    plan = plans.make_plan(4, 512, (256, 512), (1, 2), "groups", plans.SMALL_PART_TILES, 132)
    q = torch.randn(1, 512, 4, 64, dtype=torch.bfloat16).transpose(1, 2)
    (launch,) = worklist.forward_launches(plan, False, q, q, q)
    env = (("TRITON_CACHE_DIR", str(tmp_path)),)
    with package_compiles() as compiles:
        precompile.compile_launch(SM90, env, launch)
        precompile.compile_launch(SM90, env, launch)
    assert compiles == [{"kernel": "forward_kernel", "cache_hit": False},
                        {"kernel": "forward_kernel", "cache_hit": True}]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("path", ["work list", "gathered blocks"])
@pytest.mark.parametrize("head_split", ["groups", "longnet"])
def test_a_compiled_step_finds_its_kernels_compiled(head_split, path):
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "TORCHINDUCTOR_COMPILE_THREADS": "4",  # compile workers (the suite runs without)
           "DILATED_COMPILER": "inductor"}  # through AOTAutograd, which runs the op's fake implementation
    env.pop(precompile.SETTING, None)
    res = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "precompile_child.py"), head_split, path],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads(res.stdout.strip().splitlines()[-1])
    report["log"] = [line for line in res.stderr.splitlines() if "dilated_compile" in line][-20:]
    if path == "work list":
        expected = set().union(*_kernel_names(plans.make_plan(4, 1000, (256, 512), (1, 2), head_split), True))
    else:
        expected = {"gather_kernel", "combine_kernel"}
    assert set(report["submitted"]) == expected, report
    assert {c["kernel"] for c in report["compiles"]} == expected, report
    assert all(c["cache_hit"] for c in report["compiles"]), report
    assert {x["kernel"] for x in report["launchers"]} == expected, report
    assert not any(x["built_here"] for x in report["launchers"]), report
