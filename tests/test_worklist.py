"""The work-list kernels (`lowering/dilated/worklist.py`) against the float64
reference: output, log-sum-exp and gradients, over the shapes that break
dilated attention (length not a multiple of the segment or shorter than the
smallest, uneven head groups, rates not dividing the segment, heads fewer
than a rate). On CUDA the compiled kernels run in fp16/bf16; without CUDA,
Triton's interpreter runs them in fp32 and fp16 on CPU tensors
(tests/test_worklist_interpreter.py starts this file in a child process with
TRITON_INTERPRET=1)."""

import math
import os

import pytest
import torch

from dilated_compile.lowering.dilated import worklist
from dilated_compile.lowering.dilated.plan import make_plan
from dilated_compile.lowering.reference import dilated_counts, dilated_reference

from .tolerance import assert_within

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA: run with TRITON_INTERPRET=1 to test the kernels on CPU", allow_module_level=True)
triton = pytest.importorskip("triton")

# Under the interpreter fp32, and fp16 for the half-precision dots and casts the GPU runs
# (the interpreter cannot run bf16 dots: triton-lang/triton#11584)
DTYPES = [torch.bfloat16, torch.float16] if DEVICE == "cuda" else [torch.float32, torch.float16]
GRAD_TOL = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 6e-2}

CASES = [
    # batch, heads, N, segments, rates, head_split, causal
    (1, 4, 40, (8, 16), (1, 2), "groups", True),  # N not a multiple of 16
    (1, 3, 33, (8, 16), (2, 5), "groups", False),  # uneven head groups, 5 not dividing 16
    (2, 3, 9, (16, 32), (1, 2), "groups", True),  # N shorter than every segment
    (1, 4, 37, (8, 16, 32), (1, 2, 4), "longnet", True),
    (1, 3, 50, (16, 64), (3, 6), "longnet", False),  # heads fewer than a rate
    (2, 3, 37, (8, 16, 32), (1, 2, 4), "longnet", True),  # two batch elements summing into the accumulators
    (1, 2, 64, (64,), (1,), "longnet", False),  # one pattern w = N, r = 1: dense attention
    (1, 3, 150, (32, 64), (1, 2), "longnet", True),  # 16-row union items, several blocks per window
    (2, 5, 90, (24, 48), (2, 3), "longnet", False),  # union stride 6, windows in a ragged segment
    (1, 4, 70, (16, 96), (4, 1), "longnet", True),  # positions no pattern selects; w > N
]


def _lse_reference(q, k, count, scale):
    """log of sum over keys of count * exp(score), float64; -inf where no key."""
    s = (q.double() @ k.double().transpose(-2, -1)) * scale
    logc = torch.where(count > 0, count.double().log(), -math.inf).to(s.device)
    return torch.logsumexp(s + logc, dim=-1)


def _case_id(case, union: str) -> str:
    b, h, n, seg, rates, split, causal = case
    return f"{split}{'-' + union if split == 'longnet' else ''}-H{h}-N{n}-{'causal' if causal else 'full'}"


# longnet both as one softmax over its patterns' keys and per pattern, merged; and as the
# default chooses: causal, 32-row union items: the merged forward, the union backward
RUNS = [(c, u) for c in CASES for u in (("on", "off") if c[5] == "longnet" else ("auto",))]
RUNS.append(((1, 2, 160, (64, 128), (1, 2), "longnet", True), "auto"))


# how the forward's items reach the kernel: launched with rows read through pointers
# (``DILATED_WORKLIST_TMA=off``) or through tensor descriptors (on: also for this head dim
# and under the interpreter), or recorded into a traced graph (pointers)
LAUNCHES = {"launched": (False, "off"), "descriptors": (False, "on"), "traced": (True, "auto")}


# every dtype with every launch; under the interpreter fp16 with the launched kernels only
# (a traced launch records the same kernels, whatever the dtype)
DTYPE_LAUNCHES = [(d, x) for d in DTYPES for x in LAUNCHES if DEVICE == "cuda" or d == torch.float32 or x != "traced"]


@pytest.mark.parametrize("dtype,launch", DTYPE_LAUNCHES, ids=[f"{str(d)[6:]}-{x}" for d, x in DTYPE_LAUNCHES])
@pytest.mark.parametrize("case,union", RUNS, ids=[_case_id(c, u) for c, u in RUNS])
def test_worklist_matches_reference(monkeypatch, case, union, dtype, launch):
    """`launch`: see `LAUNCHES` (traced: the launches a compiled graph records with
    ``wrap_triton``, here run eagerly); `union` (``DILATED_WORKLIST_UNION``): ``longnet``
    as one softmax (on) or merged (off)."""
    traced, tma = LAUNCHES[launch]
    monkeypatch.setenv(worklist.UNION_SETTING, union)
    monkeypatch.setenv(worklist.TMA_SETTING, tma)
    # on CUDA twice, on fresh inputs: the second call launches the compiled kernels directly
    for seed in (0, 1) if DEVICE == "cuda" else (0,):
        _check_against_reference(case, dtype, seed, traced)


def _check_against_reference(case, dtype, seed, traced):
    b, h, n, seg, rates, split, causal = case
    d, scale = 16, 0.3
    g = torch.Generator(device=DEVICE).manual_seed(n + 1000 * seed)
    # stored (B, N, H, D), seen as (B, H, N, D): the layout a model's projections give
    q, k, v = (torch.randn(b, n, h, d, device=DEVICE, dtype=dtype, generator=g).transpose(1, 2) for _ in range(3))
    dout = torch.randn(b, h, n, d, device=DEVICE, dtype=dtype, generator=g)
    plan = make_plan(h, n, seg, rates, split)

    out, lse = worklist.forward(plan, causal, scale, q, k, v, traced=traced)
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert out.transpose(1, 2).is_contiguous() and lse.transpose(1, 2).is_contiguous()
    qd, kd, vd = (t.detach().double().cpu().requires_grad_() for t in (q, k, v))
    ref = dilated_reference(qd, kd, vd, seg, rates, head_split=split, is_causal=causal, scale=scale)
    assert_within(out, ref, q, k, v, is_causal=causal, scale=scale)

    count = dilated_counts(h, n, seg, rates, split, causal)
    want_lse = _lse_reference(qd.detach(), kd.detach(), count, scale)
    finite = torch.isfinite(want_lse)
    assert torch.equal(finite, torch.isfinite(lse.cpu()))
    lse_tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(lse.cpu().double()[finite], want_lse[finite], atol=lse_tol, rtol=lse_tol)

    grads = worklist.backward(plan, causal, scale, q, k, v, out, lse, dout, traced=traced)
    ref.backward(dout.double().cpu())
    for name, got, want in zip(("dq", "dk", "dv"), grads, (qd.grad, kd.grad, vd.grad)):
        assert got.dtype == dtype and got.transpose(1, 2).is_contiguous()
        assert not torch.isnan(got).any(), name
        err = (got.double().cpu() - want).abs().max().item()
        assert err <= GRAD_TOL[dtype] * max(want.abs().max().item(), 1.0), f"{name}: error {err:.3g}"
