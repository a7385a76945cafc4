"""The work-list path of dilated attention on CUDA (skipped without CUDA): through
`dilated_attention`, the compiled backend (static and dynamic lengths) and
activation checkpointing, against the float64 reference and the gathered-block
path (``DILATED_WORKLIST=off``)."""

import re

import pytest
import torch
import torch.nn.functional as F

import dilated_compile
from dilated_compile import dilated_attention, dilated_reference
from dilated_compile.lowering.dilated import worklist
from dilated_compile.lowering.dilated.plan import plan_for

from .tolerance import assert_within

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

CASES = [
    # (N, H, D, segments, rates)
    (300, 5, 64, (64, 128, 256), (1, 2, 4)),
    (512, 16, 128, (128, 256, 512), (1, 6, 12)),
    (77, 3, 128, (16, 1024), (2, 16)),
    (1000, 7, 32, (96, 200, 384), (1, 3, 5)),
]
GRAD_TOL = {torch.float16: 2e-2, torch.bfloat16: 6e-2}


@pytest.fixture(autouse=True)
def worklist_on(monkeypatch):
    """The work list is opt-in (``DILATED_WORKLIST=on``)."""
    monkeypatch.setenv("DILATED_WORKLIST", "on")


@pytest.fixture
def calls(monkeypatch):
    """Counts the work list's forward and backward calls."""
    seen = {"forward": 0, "backward": 0}
    for name in seen:
        real = getattr(worklist, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            seen[_name] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(worklist, name, spy)
    return seen


def _qkv(b, n, h, d, dtype, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return [
        torch.randn(b, n, h, d, device="cuda", dtype=dtype, generator=g).transpose(1, 2).requires_grad_()
        for _ in range(3)
    ]


def _check_grads(xs, refs, dtype):
    for name, x, r in zip(("dq", "dk", "dv"), xs, refs):
        err = (x.grad.double() - r.grad).abs().max().item()
        assert err <= GRAD_TOL[dtype] * max(r.grad.abs().max().item(), 1.0), f"{name}: {err}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("head_split", ["groups", "longnet"])
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("case", CASES, ids=[f"N{c[0]}-H{c[1]}-D{c[2]}" for c in CASES])
def test_eager_matches_reference(calls, case, is_causal, head_split, dtype):
    n, h, d, seg, rates = case
    q, k, v = _qkv(2, n, h, d, dtype, seed=n)
    out = dilated_attention(q, k, v, seg, rates, head_split=head_split, is_causal=is_causal)
    dout = torch.randn_like(out)
    out.backward(dout)
    assert calls == {"forward": 1, "backward": 1}
    refs = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = dilated_reference(*refs, seg, rates, head_split=head_split, is_causal=is_causal)
    ref.backward(dout.double())
    assert_within(out, ref, q.detach(), k.detach(), v.detach(), is_causal=is_causal)
    _check_grads((q, k, v), refs, dtype)


@pytest.mark.parametrize("head_split", ["groups", "longnet"])
def test_off_switch_runs_the_gathered_blocks(monkeypatch, calls, head_split):
    """DILATED_WORKLIST=off (and a forced DILATED_KERNEL, which DILATED_WORKLIST=on
    then says it cannot honour) run the gathered-block path, which agrees with the
    work list."""
    n, h, d, seg, rates = CASES[0]
    q, k, v = _qkv(1, n, h, d, torch.bfloat16, seed=3)
    on = dilated_attention(q, k, v, seg, rates, head_split=head_split, is_causal=True)
    monkeypatch.setenv("DILATED_WORKLIST", "off")
    off = dilated_attention(q, k, v, seg, rates, head_split=head_split, is_causal=True)
    monkeypatch.setenv("DILATED_WORKLIST", "on")
    monkeypatch.setenv("DILATED_KERNEL", "flash")
    with pytest.warns(UserWarning, match="DILATED_KERNEL=flash forces a block kernel"):
        forced = dilated_attention(q, k, v, seg, rates, head_split=head_split, is_causal=True)
    assert calls["forward"] == 1
    assert (on.float() - off.float()).abs().max().item() < 2e-2
    assert (forced.float() - off.float()).abs().max().item() < 2e-2


@pytest.mark.parametrize("head_split", ["groups", "longnet"])
def test_compiled_dynamic_lengths_match_reference(calls, head_split):
    """backend="dilated" with a dynamic length: one compiled graph, two lengths, each
    matching the reference (output and gradients) through the work list. q, k and v
    come from one tensor whose length is marked dynamic, so that they share one
    symbolic length (heads and head dim stay static, as the rewrite needs)."""
    seg, rates = (64, 128), (1, 2)
    policy = {
        "version": 1,
        "rules": [{"match": "re:.*", "attention": "dilated", "segment_lengths": list(seg),
                   "dilation_rates": list(rates), "head_split": head_split}],
    }

    def attend(qkv):  # (B, N, 3, H, D) in, (B, N, H, D) out, as a model's projections
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
        return F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2)

    torch._dynamo.reset()
    dilated_compile.clear_reports()
    compiled = torch.compile(attend, backend="dilated", options={"policy": policy})
    for n in (200, 333):
        g = torch.Generator(device="cuda").manual_seed(n)
        qkv = torch.randn(1, n, 3, 4, 64, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
        torch._dynamo.mark_dynamic(qkv, 1)
        out = compiled(qkv)
        dout = torch.randn_like(out)
        out.backward(dout)
        refs = [t.detach().double().transpose(1, 2).contiguous().requires_grad_() for t in qkv.unbind(2)]
        ref = dilated_reference(*refs, seg, rates, head_split=head_split, is_causal=True)
        ref.backward(dout.double().transpose(1, 2))
        assert_within(out.transpose(1, 2), ref, *(t.detach().transpose(1, 2) for t in qkv.unbind(2)), is_causal=True)
        for name, grad, r in zip(("dq", "dk", "dv"), qkv.grad.unbind(2), refs):
            err = (grad.double().transpose(1, 2) - r.grad).abs().max().item()
            assert err <= GRAD_TOL[torch.bfloat16] * max(r.grad.abs().max().item(), 1.0), f"{name} N={n}: {err}"
    assert calls["forward"] == 2 and calls["backward"] == 2
    (report,) = dilated_compile.reports()  # one graph for both lengths
    site = report.sites[0].attention
    assert "dynamic length" in site and "kernel: work list (DILATED_WORKLIST=on)" in site, site


def test_activation_checkpointing_gives_the_same_gradients(calls):
    n, h, d, seg, rates = CASES[1]
    q, k, v = _qkv(1, n, h, d, torch.bfloat16, seed=5)

    def attend(q, k, v):
        return dilated_attention(q, k, v, seg, rates, head_split="longnet", is_causal=True) * 2

    dout = torch.randn(1, h, n, d, device="cuda", dtype=torch.bfloat16)
    attend(q, k, v).backward(dout)
    plain = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    torch.utils.checkpoint.checkpoint(attend, q, k, v, use_reentrant=False).backward(dout)
    assert calls["forward"] == 3  # the checkpointed forward runs twice
    for a, t in zip(plain, (q, k, v)):
        # longnet sums gradients with fp32 atomics: equal up to the order of the sums
        assert (a.float() - t.grad.float()).abs().max().item() <= 1e-2 * max(a.abs().max().item(), 1.0)


def _sdpa_of_projections(is_causal: bool):
    def attend(q, k, v):  # (B, N, H, D) in and out, as a model's projections
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             is_causal=is_causal)
        return out.transpose(1, 2)

    return attend


# CASES[0]; one whose ``longnet`` items are large enough to run as one softmax (64 rows)
INLINE_CASES = [CASES[0], (512, 4, 64, (128, 256), (1, 2))]


@pytest.mark.parametrize("inline", ["on", "off"])
@pytest.mark.parametrize("head_split", ["groups", "longnet"])
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("case", INLINE_CASES, ids=["n300", "n512"])
def test_compiled_static_site_launches_the_work_list_from_inductors_code(
        monkeypatch, inline, head_split, is_causal, case):
    """backend="dilated" with static lengths: Inductor's generated code launches the
    work list's kernels itself, forward and backward, and calls no custom op for
    them, with DILATED_INLINE=on, and runs no kernel of its own around them;
    output and gradients match the float64 reference either way."""
    from torch._inductor.utils import run_and_get_code

    monkeypatch.setenv("DILATED_INLINE", inline)
    n, h, d, seg, rates = case
    policy = {
        "version": 1,
        "rules": [{"match": "re:.*", "attention": "dilated", "segment_lengths": list(seg),
                   "dilation_rates": list(rates), "head_split": head_split}],
    }
    torch._dynamo.reset()
    compiled = torch.compile(_sdpa_of_projections(is_causal), backend="dilated", options={"policy": policy})
    q, k, v = (t.detach().transpose(1, 2).requires_grad_() for t in _qkv(2, n, h, d, torch.bfloat16, seed=7))
    dout = torch.randn(2, n, h, d, device="cuda", dtype=torch.bfloat16)

    def step():
        out = compiled(q, k, v)
        out.backward(dout)
        return out

    out, codes = run_and_get_code(step)
    code = "\n".join(codes)
    launched = {name for name in ("forward_kernel", "union_forward_kernel", "backward_kernel", "union_backward_kernel")
                if re.search(rf"\b{name}\.run\(|\bdef {name}\(", code)}
    called = {name: f"torch.ops.dilated_compile.{name}.default" in code
              for name in ("dilated_attention", "dilated_attention_backward")}
    if inline == "on":
        plan = plan_for(q.transpose(1, 2), tuple(seg), tuple(rates), head_split)
        union = [worklist.runs_as_union(plan, is_causal, backward) for backward in (False, True)]
        expected = {"union_forward_kernel" if union[0] else "forward_kernel",
                    "union_backward_kernel" if union[1] else "backward_kernel"}
        assert launched == expected, (launched, expected)
        assert not called["dilated_attention"] and not called["dilated_attention_backward"], code
        assert "lift_fresh_copy" not in code, code  # the work items are read in place
        # no kernel of Inductor's own: outputs and sums are not copied, zeroed or cast by the graph
        assert "triton_poi" not in code and "triton_per" not in code, code
    else:
        assert not launched and all(called.values()), code
    refs = [t.detach().double().transpose(1, 2).requires_grad_() for t in (q, k, v)]
    ref = dilated_reference(*refs, seg, rates, head_split=head_split, is_causal=is_causal)
    ref.backward(dout.double().transpose(1, 2))
    assert_within(out.transpose(1, 2), ref, *(t.detach().transpose(1, 2) for t in (q, k, v)), is_causal=is_causal)
    for name, x, r in zip(("dq", "dk", "dv"), (q, k, v), refs):
        err = (x.grad.double().transpose(1, 2) - r.grad).abs().max().item()
        assert err <= GRAD_TOL[torch.bfloat16] * max(r.grad.abs().max().item(), 1.0), f"{name}: {err}"
