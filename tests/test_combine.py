"""The Triton combine (spread + log-sum-exp merge, and the gradients' spread-sum)
against the pointwise version in `lowering/dilated/compute.py`. On CUDA the
compiled kernel runs; without CUDA, Triton's interpreter runs it on CPU tensors
(when triton is installed)."""

import os

import pytest
import torch

from dilated_compile.lowering.common import combine
from dilated_compile.lowering.dilated import compute as dilated
from dilated_compile.lowering.dilated.plan import ALL_PARTS_SMALL, make_plan
from dilated_compile.lowering.common.block_kernels import block_attention

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    # Triton reads it when it is first imported (torch imports triton early).
    pytest.skip("no CUDA: run with TRITON_INTERPRET=1 to test the kernel on CPU", allow_module_level=True)
triton = pytest.importorskip("triton")


CASES = [
    # heads, N, segments, rates, head_split
    (5, 40, (8, 16), (1, 2), "groups"),
    (4, 37, (8, 16, 32), (1, 2, 4), "longnet"),
    (3, 50, (16, 64), (3, 6), "longnet"),  # rate not dividing segment, heads < rate
    (6, 9, (4, 8, 16), (1, 2, 4), "groups"),  # N smaller than the largest segment
    (7, 33, (8, 16), (2, 5), "groups"),  # uneven head groups
]


DTYPES = [torch.bfloat16, torch.float32]  # float32 too: on CUDA it runs this path (Triton bug)


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp32"])
@pytest.mark.parametrize("small_tiles", [0, ALL_PARTS_SMALL], ids=["views", "batched"])
@pytest.mark.parametrize("case", CASES, ids=[f"{c[4]}-H{c[0]}-N{c[1]}" for c in CASES])
def test_combine_matches_pointwise_assembly(case, small_tiles, dtype):
    h, n, seg, rates, split = case
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, h, n, 16, device=DEVICE, dtype=dtype) for _ in range(3))
    plan = make_plan(h, n, seg, rates, split, small_tiles)
    blocks = [dilated.gather_calls(plan, x) for x in (q, k, v)]
    res = [block_attention(a, b, c, is_causal=True, scale=0.25) for a, b, c in zip(*blocks)]
    outs, lses = [r.out for r in res], [r.lse for r in res]

    check_merge(plan, outs, lses, q)

    grads = [torch.randn_like(o) for o in outs]
    want = dilated.spread_sum(plan, [g.float() for g in grads], q)
    got = combine.spread_sum(plan, grads, q)
    assert got.dtype == q.dtype
    tol = _tolerance(dtype)
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)


def _tolerance(dtype: torch.dtype) -> float:
    return 1e-2 if dtype == torch.bfloat16 else 1e-5


def check_merge(plan, outs, lses, q):
    """`combine.merge` of the calls' results equals `dilated.assemble`; returns (out, lse)."""
    want_out, want_lse = dilated.assemble(plan, outs, lses, q.shape[0], q)
    got_out, got_lse = combine.merge(plan, outs, lses, q)
    assert got_out.dtype == q.dtype and got_lse.dtype == torch.float32
    assert got_out.transpose(1, 2).is_contiguous()  # stored (B, N, H, D)
    tol = _tolerance(q.dtype)
    torch.testing.assert_close(got_out.float(), want_out.float(), atol=tol, rtol=tol)
    finite = torch.isfinite(want_lse)
    assert torch.equal(finite, torch.isfinite(got_lse))
    torch.testing.assert_close(got_lse[finite], want_lse[finite].float(), atol=1e-5, rtol=1e-5)
    return got_out, got_lse


def check_spread_sums(plan, grads, xs):
    """`combine.spread_sums` of ``grads[s]`` (the calls' blocks) equals `dilated.spread_sum`."""
    got = combine.spread_sums(plan, grads, xs)
    for g, x, y in zip(grads, xs, got):
        assert y.dtype == x.dtype and y.transpose(1, 2).is_contiguous()
        want = dilated.spread_sum(plan, [t.float() for t in g], x)
        tol = _tolerance(x.dtype)
        torch.testing.assert_close(y.float(), want.float(), atol=tol, rtol=tol)


def check_backward_blocks(plan, dout, out, lse, qs):
    """`combine.backward_blocks` equals the per-call gathers, laid out as cuDNN wants."""
    douts, outs, lses = combine.backward_blocks(plan, dout, out, lse, qs)
    for got, want in ((douts, dilated.gather_calls(plan, dout)), (outs, dilated.gather_calls(plan, out))):
        for g, w, qc in zip(got, want, qs):
            assert g.stride() == torch.empty_like(qc).stride()
            assert torch.equal(g, w)
    want_lse = [t.squeeze(-1) for t in dilated.gather_calls(plan, lse.unsqueeze(-1))]
    for g, w in zip(lses, want_lse):
        assert g.is_contiguous() and torch.equal(g, w)


@pytest.mark.parametrize("mixed_layouts", [False, True], ids=["one-launch", "per-tensor"])
@pytest.mark.parametrize("small_tiles", [0, ALL_PARTS_SMALL], ids=["views", "batched"])
@pytest.mark.parametrize("case", CASES, ids=[f"{c[4]}-H{c[0]}-N{c[1]}" for c in CASES])
def test_spread_sums_of_three_gradients(case, small_tiles, mixed_layouts):
    """dq, dk and dv spread in one launch (blocks of one layout) or one launch each
    (the third gradient's blocks stored with other strides) equal `dilated.spread_sum`."""
    h, n, seg, rates, split = case
    torch.manual_seed(1)
    q, k, v = (torch.randn(2, h, n, 16, device=DEVICE, dtype=torch.bfloat16) for _ in range(3))
    plan = make_plan(h, n, seg, rates, split, small_tiles)
    blocks = dilated.gather_calls(plan, q)
    grads = [[torch.randn_like(b) for b in blocks] for _ in range(3)]
    if mixed_layouts:
        grads[2] = [g.transpose(0, 2).contiguous().transpose(0, 2) for g in grads[2]]
    check_spread_sums(plan, grads, (q, k, v))


@pytest.mark.parametrize("small_tiles", [0, ALL_PARTS_SMALL], ids=["views", "batched"])
@pytest.mark.parametrize("case", CASES, ids=[f"{c[4]}-H{c[0]}-N{c[1]}" for c in CASES])
def test_backward_blocks_match_gathers(case, small_tiles):
    """The backward's one-kernel gather of grad_out, out and lse into every call's
    blocks equals the per-call gathers, in the layout cuDNN wants (empty_like(q))."""
    h, n, seg, rates, split = case
    torch.manual_seed(1)
    b, d = 2, 16
    dout, out = (torch.randn(b, n, h, d, device=DEVICE, dtype=torch.bfloat16).transpose(1, 2) for _ in range(2))
    lse = torch.randn(b, n, h, device=DEVICE).transpose(1, 2)
    q = torch.randn(b, h, n, d, device=DEVICE, dtype=torch.bfloat16)
    plan = make_plan(h, n, seg, rates, split, small_tiles)
    (qs,) = dilated.gather_blocks(plan, [q])
    check_backward_blocks(plan, dout, out, lse, qs)


@pytest.mark.parametrize("small_tiles", [0, ALL_PARTS_SMALL], ids=["views", "batched"])
@pytest.mark.parametrize("layout", ["bhnd", "bnhd"])
@pytest.mark.parametrize("head_split", ["groups", "longnet"])
def test_gather_blocks_equal_the_traced_gathers(head_split, layout, small_tiles):
    """The Triton path's q/k/v blocks (strided views, and one kernel for the
    batched calls) equal `gather_calls`', for both input layouts and batch > 1."""
    b, h, n, d = 2, 7, 45, 16
    shape = (b, h, n, d) if layout == "bhnd" else (b, n, h, d)
    xs = [torch.randn(shape, device=DEVICE, dtype=torch.bfloat16) for _ in range(3)]
    if layout == "bnhd":
        xs = [x.transpose(1, 2) for x in xs]
    plan = make_plan(h, n, (8, 16, 32), (1, 3, 4), head_split, small_tiles)
    blocks = dilated.gather_blocks(plan, xs)
    for x, got in zip(xs, blocks):
        want = dilated.gather_calls(plan, x)
        assert len(got) == len(want) == len(plan.calls)
        for g, w in zip(got, want):
            assert g.shape == w.shape and torch.equal(g, w)


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp32"])
def test_kernels_on_a_plan_of_one_part_and_many_part_calls(dtype):
    """Every kernel on one LongNet plan of three patterns with ragged tails whose calls
    hold one part (on views) or several (batched blocks): the gather of q, k and v, the
    merge, the backward's gather of grad_out, out and lse, and the spread of three
    gradients in one launch equal the traced gathers, `assemble` and `spread_sum`."""
    h, n, seg, rates = 4, 37, (8, 16, 32), (1, 2, 4)
    torch.manual_seed(3)
    q, k, v, dout = (torch.randn(2, h, n, 16, device=DEVICE, dtype=dtype) for _ in range(4))
    plan = make_plan(h, n, seg, rates, "longnet", 3)  # parts of < 3 query tiles batched
    assert sorted(len(parts) for parts in plan.calls) == [1, 1, 1, 1, 1, 2, 3, 4]
    blocks = dilated.gather_blocks(plan, (q, k, v))
    for x, got in zip((q, k, v), blocks):
        for g, w in zip(got, dilated.gather_calls(plan, x)):
            assert torch.equal(g, w)
    res = [block_attention(a, b, c, is_causal=True, scale=0.25) for a, b, c in zip(*blocks)]
    out, lse = check_merge(plan, [r.out for r in res], [r.lse for r in res], q)
    check_backward_blocks(plan, dout, out, lse, blocks[0])
    check_spread_sums(plan, [[torch.randn_like(b) for b in blocks[0]] for _ in range(3)], (q, k, v))


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp32"])
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("case", CASES, ids=[f"{c[4]}-H{c[0]}-N{c[1]}" for c in CASES])
def test_triton_path_matches_float64_reference(monkeypatch, case, is_causal, dtype):
    """The whole Triton path (gather_blocks, kernels, merge; backward_blocks, kernels'
    backward, spread-sum) against the float64 reference, output and gradients.
    On CPU it runs in the interpreter around the CPU flash kernel."""
    from dilated_compile import dilated_reference

    from .tolerance import assert_within

    h, n, seg, rates, split = case
    monkeypatch.setattr(combine, "runs_on", lambda q: True)
    torch.manual_seed(2)
    q, k, v = (torch.randn(2, h, n, 16, device=DEVICE, dtype=dtype) for _ in range(3))
    plan = make_plan(h, n, seg, rates, split, 0)
    out, lse = dilated.dilated_forward(plan, is_causal, 0.25, q, k, v)
    qd, kd, vd = (t.double().cpu().requires_grad_() for t in (q, k, v))
    ref = dilated_reference(qd, kd, vd, seg, rates, head_split=split, is_causal=is_causal, scale=0.25)
    assert_within(out, ref, q, k, v, is_causal=is_causal, scale=0.25)
    dout = torch.randn_like(out)
    grads = dilated.dilated_backward(plan, is_causal, 0.25, q, k, v, out, lse, dout)
    ref.backward(dout.double().cpu())
    for name, g, r in zip(("dq", "dk", "dv"), grads, (qd.grad, kd.grad, vd.grad)):
        err = (g.double().cpu() - r).abs().max().item()
        tol = 6e-2 if dtype == torch.bfloat16 else 1e-4
        assert err <= tol * max(r.abs().max().item(), 1.0), f"{name}: {err}"
