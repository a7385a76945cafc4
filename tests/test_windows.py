"""Sliding-window masks (docs/spec.md, "Sliding windows"): a constant mask that keeps
i - W < j <= i (causal) or |i - j| < W (bidirectional) is recognised in every form a mask
takes, and `attention: dense` keeps it exactly at the cost of the window (block-sparse
attention with a token window); block_sparse rules intersect their pattern with it; dilated
rules leave the site with the reason. Rings: tests/ring_window_cases.py."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from dilated_compile import block_sparse_attention, block_sparse_reference, dense_reference, explain
from dilated_compile.lowering.block_sparse.window import dense_window_spec
from dilated_compile.passes.masks import MaskForm, NotProvable, classify, keep_from_mask

from .models import rewritten_eager
from .tolerance import assert_within

N = 24
DENSE = {"version": 1, "rules": [{"match": "**", "attention": "dense"}]}
DILATED = {"version": 1, "rules": [{"match": "**", "attention": "dilated", "segment_lengths": [8],
                                    "dilation_rates": [1]}]}
BLOCK_SPARSE = {"version": 1, "rules": [{"match": "**", "attention": "block_sparse", "block_size": 4,
                                         "pattern": {"kind": "local_window", "window": 0}}]}


def window_keep(n: int, window: int, causal: bool) -> torch.Tensor:
    i = torch.arange(n)
    d = i[:, None] - i[None, :]
    return ((d >= 0) & (d < window)) if causal else (d.abs() < window)


def additive(keep: torch.Tensor, fill: float) -> torch.Tensor:
    return torch.zeros(keep.shape).masked_fill(~keep, fill)


# ---------------------------------------------------------------------------
# recognition


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("window", [1, 3, N - 1, N, N + 5])
@pytest.mark.parametrize("how", ["bool", "additive-min", "additive-inf", "4d"])
def test_window_masks_are_recognised(causal, window, how):
    keep = window_keep(N, window, causal)
    mask = {"bool": keep, "additive-min": additive(keep, torch.finfo(torch.float32).min),
            "additive-inf": additive(keep, float("-inf")), "4d": keep[None, None].expand(2, 3, N, N)}[how]
    found = classify(keep_from_mask(mask), N, N)
    if window >= N:  # as wide as the sequence: the causal mask, or no mask
        assert found == MaskForm(causal)
    elif window == 1:  # a token's own position only: the same mask both ways
        assert found == MaskForm(True, 1)
    else:
        assert found == MaskForm(causal, window)


def test_masks_that_are_not_windows_are_not_provable():
    keep = window_keep(N, 4, True)
    strict = keep & ~torch.eye(N, dtype=torch.bool)  # off by one: keys i-3 .. i-1
    padded = keep[None].repeat(2, 1, 1)
    padded[0, :, :3] = False  # a window and left padding in one batch entry
    ragged = keep.clone()
    ragged[N - 1, N - 5] = True  # one row one key wider
    for mask, reason in ((strict, "neither the causal mask, a sliding window"), (padded, "padding"),
                         (ragged, "neither the causal mask, a sliding window")):
        with pytest.raises(NotProvable, match=reason):
            classify(mask, N, N)


class Sites(torch.nn.Module):
    """A causal sliding window through SDPA (bool mask), a bidirectional one written by hand
    (additive mask from arange, as HF models build it)."""

    def __init__(self, window: int = 5):
        super().__init__()
        self.window = window

    def forward(self, q, k, v):
        n = q.shape[-2]
        i = torch.arange(n)
        d = i[:, None] - i[None, :]
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=(d >= 0) & (d < self.window))
        bias = torch.zeros(n, n).masked_fill(d.abs() >= self.window, torch.finfo(torch.float32).min)
        b = torch.softmax(q @ k.transpose(-2, -1) * 0.25 + bias, dim=-1) @ v
        return a, b


def _qkv(requires_grad=False):
    torch.manual_seed(0)
    return [torch.randn(2, 2, N, 16, requires_grad=requires_grad) for _ in range(3)]


def test_explain_shows_the_window_and_what_it_became():
    report = explain(Sites(5), *_qkv(), policy=DENSE)
    causal, local = report.sites
    assert causal.form == "sdpa+sliding-window(W=5)" and local.form == "matmul-softmax+local-window(W=5)"
    for site in report.sites:
        assert site.status == "rewritten", str(report)
        assert site.attention.startswith("dense in a sliding window W=5, as block_sparse"), str(report)
    assert "block_sparse_attention" in report.diff and "token_window" in report.diff
    assert "sliding-window(W=5)" in str(report)


def test_window_as_wide_as_the_sequence_is_plain_causal():
    report = explain(Sites(N), *_qkv(), policy=DENSE)
    assert [s.form for s in report.sites] == ["sdpa+causal-mask", "matmul-softmax"]
    assert [s.attention for s in report.sites] == ["dense (unchanged)"] * 2


def test_unmatched_window_site_is_untouched():
    policy = {"version": 1, "rules": [{"match": "elsewhere", "attention": "dense"}]}
    with pytest.warns(UserWarning, match="matches no attention site"):
        report = explain(Sites(5), *_qkv(), policy=policy)
    assert [s.status for s in report.sites] == ["left", "left"] and report.diff == ""


# ---------------------------------------------------------------------------
# numerics


class CausalWindow(torch.nn.Module):
    def forward(self, q, k, v):
        return Sites(5)(q, k, v)[0]


def _reference_and_grads(q, k, v, causal: bool, scale=None):
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = dense_reference(q64, k64, v64, is_causal=causal, window=5, scale=scale)
    return ref, torch.autograd.grad((ref * ref).sum(), (q64, k64, v64))


def _check(out, q, k, v, causal: bool, scale=None):
    ref, ref_grads = _reference_and_grads(q, k, v, causal, scale)
    assert_within(out, ref, q, k, v, is_causal=causal, scale=scale)
    for name, g, want in zip("qkv", torch.autograd.grad((out * out).sum(), (q, k, v)), ref_grads):
        torch.testing.assert_close(g.double(), want, atol=2e-5, rtol=1e-4, msg=f"grad {name}")


@pytest.mark.inductor
def test_compiled_dense_window_equals_reference():
    """Through Inductor (forward and backward): the causal SDPA site."""
    torch._dynamo.reset()
    q, k, v = _qkv(requires_grad=True)
    out = torch.compile(CausalWindow(), backend="dilated", options={"policy": DENSE})(q, k, v)
    _check(out, q, k, v, True)


def test_rewritten_dense_window_equals_reference():
    """Both sites rewritten, the graph run eagerly."""
    torch._dynamo.reset()
    q, k, v = _qkv(requires_grad=True)
    a, b = rewritten_eager(Sites(5), DENSE)(q, k, v)
    _check(a, q, k, v, True)
    _check(b, q, k, v, False, scale=0.25)


@pytest.mark.parametrize("window", [1, 2, 7, 40])
@pytest.mark.parametrize("causal", [True, False])
def test_window_block_sparse_function_equals_reference(window, causal):
    """The function a dense window site calls, in float64, output and gradients, N not a
    multiple of the block."""
    torch.manual_seed(window)
    n = 45
    q, k, v = (torch.randn(1, 2, n, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    spec = dense_window_spec(window)
    out = block_sparse_attention(q, k, v, block_size=spec.block_size, pattern=spec.pattern, is_causal=causal)
    ref = dense_reference(q, k, v, is_causal=causal, window=window)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)
    for g, r in zip(torch.autograd.grad(out.sum(), (q, k, v)), torch.autograd.grad(ref.sum(), (q, k, v))):
        torch.testing.assert_close(g, r, atol=1e-12, rtol=1e-12)


def test_block_sparse_rule_intersects_its_pattern_with_the_window():
    q, k, v = _qkv()
    report = explain(Sites(5), q, k, v, policy=BLOCK_SPARSE)
    assert [s.status for s in report.sites] == ["rewritten"] * 2, str(report)
    assert "& token window 5" in report.sites[0].attention
    torch._dynamo.reset()
    a, b = rewritten_eager(Sites(5), BLOCK_SPARSE)(q, k, v)
    pattern = {"kind": "local_window", "window": 0, "token_window": 5}
    args = (q.double(), k.double(), v.double())
    ref_a = block_sparse_reference(*args, block_size=4, pattern=pattern, is_causal=True)
    ref_b = block_sparse_reference(*args, block_size=4, pattern=pattern, is_causal=False, scale=0.25)
    assert_within(a, ref_a, q, k, v, is_causal=True)
    assert_within(b, ref_b, q, k, v, is_causal=False, scale=0.25)
    # the intersection is smaller than the window alone: a block's first rows see less
    assert (ref_a - dense_reference(*args, is_causal=True, window=5)).abs().max() > 1e-3


def test_dilated_rule_leaves_window_site_with_reason_and_warning(caplog):
    from dilated_compile import load_policy
    from dilated_compile.passes import record, run_passes

    q, k, v = _qkv()
    report = explain(Sites(5), q, k, v, policy=DILATED)
    for site in report.sites:
        assert site.status == "left" and "sliding window (W=5)" in site.reason, str(report)
    with pytest.raises(Exception, match="strict"):
        explain(Sites(5), q, k, v, policy={**DILATED, "strict": True})
    loaded = load_policy(DILATED)

    def backend(gm, inputs, **_):  # the backend's passes and report, without Inductor
        new, graph_report = run_passes(gm, loaded)
        record(graph_report)
        return new.forward

    torch._dynamo.reset()
    with caplog.at_level(logging.WARNING, logger="dilated_compile"):
        a, b = torch.compile(Sites(5), backend=backend)(q, k, v)
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len([w for w in warned if "sliding window (W=5)" in w]) == 2, warned
    ea, eb = Sites(5)(q, k, v)
    assert torch.equal(a, ea) and torch.equal(b, eb)  # left as they were


# ---------------------------------------------------------------------------
# masks built by HF transformers, and a tiny HF Mistral


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_hf_built_window_masks_are_recognised(causal):
    masking = pytest.importorskip("transformers.masking_utils")
    w = 4
    if causal:  # key j for query i when i - w < j <= i
        function, want = masking.sliding_window_causal_mask_function(w), MaskForm(True, w)
    else:  # |i - j| <= w: a window of w + 1 in this package's terms
        function, want = masking.sliding_window_bidirectional_mask_function(w), MaskForm(False, w + 1)
    mask = masking.sdpa_mask(batch_size=2, q_length=N, kv_length=N, mask_function=function,
                             allow_is_causal_skip=False)
    assert classify(keep_from_mask(mask), N, N) == want
    padded = masking.sdpa_mask(batch_size=2, q_length=N, kv_length=N, mask_function=function,
                               attention_mask=torch.ones(2, N, dtype=torch.bool).index_fill(1, torch.tensor([0]), False),
                               allow_is_causal_skip=False)
    with pytest.raises(NotProvable):  # the window and a padding mask
        classify(keep_from_mask(padded), N, N)


def _reference_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                         sliding_window=None, **kwargs):
    """HF's attention interface with float64 windowed attention inside (the ground truth)."""
    groups = query.shape[1] // key.shape[1]
    key, value = (t.repeat_interleave(groups, dim=1) for t in (key, value))
    n = query.shape[2]
    window = sliding_window if sliding_window is not None and sliding_window < n else None
    out = dense_reference(query, key, value, is_causal=True, window=window, scale=scaling)
    return out.to(query.dtype).transpose(1, 2).contiguous(), None


def test_hf_mistral_sliding_window_is_rewritten_exactly():
    transformers = pytest.importorskip("transformers")
    import copy

    torch.manual_seed(0)
    torch._dynamo.reset()
    cfg = transformers.MistralConfig(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                     hidden_size=32, intermediate_size=64, vocab_size=128,
                                     max_position_embeddings=128, sliding_window=6)
    model = transformers.MistralForCausalLM(cfg)
    model.set_attn_implementation("sdpa")
    model.eval()
    ids = torch.randint(0, 128, (2, 20))
    report = explain(model, ids, policy=DENSE)
    assert [s.module for s in report.sites] == [f"model.layers.{i}.self_attn" for i in range(2)]
    for site in report.sites:
        assert "sliding-window(W=6)" in site.form and site.status == "rewritten", str(report)
        assert site.attention.startswith("dense in a sliding window W=6"), str(report)
    reference = copy.deepcopy(model)
    transformers.AttentionInterface.register("window_reference_test", _reference_attention)
    reference.set_attn_implementation("window_reference_test")
    torch._dynamo.reset()
    logits = torch.compile(model, backend="dilated", options={"policy": DENSE})(ids).logits
    expected = reference(ids).logits
    torch.testing.assert_close(logits, expected, atol=2e-5, rtol=1e-4)
    logits.pow(2).mean().backward()
    expected.pow(2).mean().backward()
    for (name, a), b in zip(model.named_parameters(), reference.parameters()):
        ga = a.grad if a.grad is not None else torch.zeros_like(a)
        gb = b.grad if b.grad is not None else torch.zeros_like(b)
        torch.testing.assert_close(ga, gb, atol=5e-5, rtol=1e-3, msg=name)


@pytest.mark.parametrize("causal", [True, False])
def test_ring_op_world_size_1_runs_the_window(causal):
    """The ring custom op (a site with a symbolic size under a ring rule) on one rank: the
    window as a token mask in the ring's steps."""
    from dilated_compile.lowering.ring.op import dynamic_ring_attention

    torch.manual_seed(1)
    q, k, v = (torch.randn(1, 2, 13, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    pattern = {"kind": "local_window", "window": 1, "token_window": 4}
    out = dynamic_ring_attention(q, k, v, world_size=1, rank=0, group_name=None, inner="block_sparse",
                                 layout="zigzag", is_causal=causal, block_size=32, pattern=pattern)
    ref = dense_reference(q, k, v, is_causal=causal, window=4)
    torch.testing.assert_close(out, ref)
    for g, r in zip(torch.autograd.grad(out.sum(), (q, k, v)), torch.autograd.grad(ref.sum(), (q, k, v))):
        torch.testing.assert_close(g, r)


class _MHAWindow(torch.nn.Module):
    def __init__(self, attn: torch.nn.MultiheadAttention):
        super().__init__()
        self.attn = attn

    def forward(self, x):
        return self.attn(x, x, x, attn_mask=~window_keep(x.shape[1], 4, True), need_weights=False)[0]


def test_multihead_attention_with_a_window_mask():
    """nn.MultiheadAttention's attn_mask (True marks keys NOT allowed) as a window: rewritten,
    equal to the same module run in float64."""
    import copy

    torch.manual_seed(2)
    mha = torch.nn.MultiheadAttention(16, 2, batch_first=True).eval()
    x = torch.randn(2, N, 16)
    report = explain(_MHAWindow(mha), x, policy=DENSE)
    (site,) = report.sites
    assert site.form == "mha+sliding-window(W=4)" and site.status == "rewritten", str(report)
    torch._dynamo.reset()
    out = rewritten_eager(_MHAWindow(mha), DENSE)(x)
    want = _MHAWindow(copy.deepcopy(mha).double())(x.double())
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)
