"""Attention wherever real models put it (docs/spec.md, "Attention sites"): every form is found,
rewritten into exactly the policy's attention, or left with a reason.

Ground truth for "rewritten exactly": `dilated_attention` called eagerly on the
same q/k/v (heads repeated for GQA, the scale the model uses). Most cases run
the rewritten graph eagerly (no Inductor, fast); a few go through the backend.
nn.MultiheadAttention and the nn.Transformer layers: tests/test_forms_mha.py.
"""

import os
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._dynamo.utils import counters

from dilated_compile import explain

from .forms_common import MHA, N, POLICY, STRICT, dilated, fresh_dynamo, rewritten_eager  # noqa: F401 (autouse fixture)


def _causal_buffer(module, size=32):
    module.register_buffer("bias", torch.tril(torch.ones(size, size, dtype=torch.bool)).view(1, 1, size, size),
                           persistent=False)


class Form(nn.Module):
    """One way of writing attention of (batch, heads, seq, dim) q, k, v, picked by `kind`."""

    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        _causal_buffer(self)

    def forward(self, q, k, v):
        n, d = q.shape[-2], q.shape[-1]
        kind = self.kind
        # SDPA with explicit masks
        if kind == "sdpa-bool-tril":
            return F.scaled_dot_product_attention(q, k, v, torch.ones(n, n, dtype=torch.bool).tril())
        if kind == "sdpa-additive-triu":
            mask = torch.full((n, n), float("-inf")).triu(1)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        if kind == "sdpa-hf-min-mask":
            keep = torch.arange(n)[None, :] <= torch.arange(n)[:, None]
            mask = torch.where(keep, torch.zeros(()), torch.finfo(q.dtype).min)[None, None]
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.expand(q.shape[0], 1, n, n))
        if kind == "sdpa-gpt2-buffer":
            return F.scaled_dot_product_attention(q, k, v, attn_mask=self.bias[:, :, :n, :n])
        if kind == "sdpa-empty-mask":
            return F.scaled_dot_product_attention(q, k, v, attn_mask=torch.ones(n, n, dtype=torch.bool))
        if kind == "sdpa-keyword-scale":
            return F.scaled_dot_product_attention(query=q, key=k, value=v, is_causal=True, scale=0.3)
        # grouped / multi-query attention with k/v heads repeated by hand
        if kind == "sdpa-repeat-interleave":
            kr, vr = (t[:, :1].repeat_interleave(q.shape[1], dim=1) for t in (k, v))
            return F.scaled_dot_product_attention(q, kr, vr, is_causal=True)
        if kind == "sdpa-expand-reshape":
            b, h = q.shape[:2]
            kr, vr = (t[:, :1, None].expand(b, 1, h, n, d).reshape(b, h, n, d) for t in (k, v))
            return F.scaled_dot_product_attention(q, kr, vr, is_causal=True)
        # hand-written
        if kind == "matmul-div-masked_fill":
            w = (q @ k.transpose(-2, -1)) / math.sqrt(d)
            w = w.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
            return torch.softmax(w, dim=-1) @ v
        if kind == "matmul-mul-additive-fp32-softmax":  # HF Llama "eager"
            mask = torch.where(torch.ones(n, n, dtype=torch.bool).tril(), 0.0, torch.finfo(q.dtype).min)
            w = torch.matmul(q, k.transpose(2, 3)) * 0.25 + mask
            w = F.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype)
            w = F.dropout(w, p=0.1, training=False)
            return torch.matmul(w, v)
        if kind == "where-buffer-full-scale":  # HF GPT-2 "eager"
            w = torch.matmul(q, k.transpose(-1, -2))
            w = w / torch.full([], d ** 0.5, dtype=w.dtype)
            w = torch.where(self.bias[:, :, :n, :n], w, torch.finfo(w.dtype).min)
            return torch.matmul(nn.functional.softmax(w, dim=-1).type(v.dtype), v)
        if kind == "einsum-scaled-q":
            w = torch.einsum("bhqd,bhkd->bhqk", q * 0.3, k)
            return torch.einsum("bhqk,bhkd->bhqd", w.float().softmax(-1).to(q.dtype), v)
        if kind == "matmul-broadcast-mqa":  # one k/v head broadcast over the query heads
            w = q @ k[:, :1].transpose(-2, -1) * 0.5
            w = w.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
            return w.softmax(-1) @ v[:, :1]
        if kind == "matmul-permute-noncausal":
            return (q.matmul(k.permute(0, 1, 3, 2)) * d ** -0.5).softmax(dim=-1).matmul(v)
        if kind == "where-inverted-causal":  # where(masked, fill, scores)
            w = torch.matmul(q, k.transpose(-1, -2)) * 0.5
            w = torch.where(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"), w)
            return w.softmax(-1) @ v
        if kind == "matmul-mT-div":  # k.mT is a getattr node in the graph
            return torch.softmax((q @ k.mT) / 2.0, dim=-1) @ v
        if kind == "matmul-swapaxes-contiguous":
            w = torch.matmul(q, k.swapaxes(-1, -2).contiguous()) * 0.5
            w = w.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
            return w.softmax(-1) @ v
        raise ValueError(kind)


# kind -> (form in the report, causal, scale the ground truth uses, q pre-scaled by)
FORMS = {
    "sdpa-bool-tril": ("sdpa+causal-mask", True, None, 1.0),
    "sdpa-additive-triu": ("sdpa+causal-mask", True, None, 1.0),
    "sdpa-hf-min-mask": ("sdpa+causal-mask", True, None, 1.0),
    "sdpa-gpt2-buffer": ("sdpa+causal-mask", True, None, 1.0),
    "sdpa-empty-mask": ("sdpa+empty-mask", False, None, 1.0),
    "sdpa-keyword-scale": ("sdpa", True, 0.3, 1.0),
    "sdpa-repeat-interleave": ("sdpa+repeat-kv", True, None, 1.0),
    "sdpa-expand-reshape": ("sdpa+repeat-kv", True, None, 1.0),
    "matmul-div-masked_fill": ("matmul-softmax+causal-mask", True, None, 1.0),
    "matmul-mul-additive-fp32-softmax": ("matmul-softmax+causal-mask", True, 0.25, 1.0),
    "where-buffer-full-scale": ("matmul-softmax+causal-mask", True, None, 1.0),
    "einsum-scaled-q": ("einsum-softmax", False, 1.0, 0.3),
    "matmul-broadcast-mqa": ("matmul-softmax+causal-mask", True, 0.5, 1.0),
    "matmul-permute-noncausal": ("matmul-softmax", False, None, 1.0),
    "where-inverted-causal": ("matmul-softmax+causal-mask", True, 0.5, 1.0),
    "matmul-mT-div": ("matmul-softmax", False, 0.5, 1.0),
    "matmul-swapaxes-contiguous": ("matmul-softmax+causal-mask", True, 0.5, 1.0),
}
ONE_KV_HEAD = ("sdpa-repeat-interleave", "sdpa-expand-reshape", "matmul-broadcast-mqa")


def _qkv(heads=3, dtype=torch.float32, n=N, d=8):
    torch.manual_seed(0)
    return [torch.randn(2, heads, n, d, dtype=dtype, requires_grad=True) for _ in range(3)]


@pytest.mark.parametrize("kind", list(FORMS))
def test_form_found_and_rewritten_exactly(kind):
    form, causal, scale, q_scale = FORMS[kind]
    model = Form(kind)
    q, k, v = _qkv()
    report = explain(model, q, k, v, policy=POLICY)
    (site,) = report.sites
    assert (site.form, site.status, site.is_causal) == (form, "rewritten", causal), str(report)

    out = rewritten_eager(model)(q, k, v)
    if kind in ONE_KV_HEAD:
        kk, vv = k[:, :1], v[:, :1]
    else:
        kk, vv = k, v
    q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q, kk, vv))
    expected = dilated(q2 * q_scale, k2, v2, is_causal=causal, scale=scale)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5)
    grad = torch.randn_like(out)
    out.backward(grad)
    expected.backward(grad)
    torch.testing.assert_close(q.grad, q2.grad, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(k.grad if kk is k else k.grad[:, :1], k2.grad, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(v.grad if vv is v else v.grad[:, :1], v2.grad, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("kind,dtype", [("matmul-mul-additive-fp32-softmax", torch.bfloat16),
                                        ("where-buffer-full-scale", torch.float32)])
def test_hand_written_through_the_backend(kind, dtype):
    """Through Inductor, with softmax dtype casts: forward and backward equal the
    eager dilated function within the tolerance of the dtype."""
    _, causal, scale, _ = FORMS[kind]
    model = Form(kind)
    q, k, v = _qkv(heads=4, dtype=dtype, n=13)
    out = torch.compile(model, backend="dilated", options={"policy": POLICY})(q, k, v)
    assert counters["dilated"]["rewritten"] == 1
    q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    expected = dilated(q2, k2, v2, is_causal=causal, scale=scale)
    tol = {"atol": 2e-2, "rtol": 2e-2} if dtype == torch.bfloat16 else {"atol": 1e-5, "rtol": 1e-5}
    torch.testing.assert_close(out, expected, **tol)
    out.float().pow(2).sum().backward()
    expected.float().pow(2).sum().backward()
    for a, b in ((q, q2), (k, k2), (v, v2)):
        torch.testing.assert_close(a.grad, b.grad, **tol)


class TransposedIn(nn.Module):
    """(batch, seq, heads, dim) tensors transposed in and out, as many models do."""

    def forward(self, q, k, v):
        t = [x.transpose(1, 2) for x in (q, k, v)]
        return F.scaled_dot_product_attention(*t, is_causal=True).transpose(1, 2)


def test_transposed_in_layout():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, N, 3, 8) for _ in range(3))
    report = explain(TransposedIn(), q, k, v, policy=POLICY)
    assert report.sites[0].shape == (2, 3, N, 8) and report.sites[0].status == "rewritten"
    out = rewritten_eager(TransposedIn())(q, k, v)
    expected = dilated(*(x.transpose(1, 2) for x in (q, k, v)), is_causal=True).transpose(1, 2)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5)


def test_bmm_three_dimensional_is_found_and_left():
    """bmm on (batch*heads, seq, dim) carries no head count: found, left with the reason."""

    def f(q, k, v):
        return torch.bmm(torch.bmm(q, k.transpose(1, 2)).softmax(-1), v)

    q = torch.randn(6, N, 8)
    report = explain(f, q, q, q, policy=POLICY)
    assert report.sites[0].status == "left" and "not 4-D" in report.sites[0].reason



# ---------------------------------------------------------------- left alone, with a reason


class Negative(nn.Module):
    """Attention that must be left as it is, picked by `kind`."""

    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, q, k, v, pad):
        n = q.shape[-2]
        kind = self.kind
        if kind == "sdpa-padding-mask":
            return F.scaled_dot_product_attention(q, k, v, attn_mask=pad[:, None, None, :])
        if kind == "sdpa-window-off-by-one":  # keys i-3 .. i-1: not the query's own position
            i = torch.arange(n)
            window = (i[None, :] < i[:, None]) & (i[:, None] - i[None, :] <= 3)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=window)
        if kind == "sdpa-mask-changed-through-view":
            mask = torch.ones(n, n, dtype=torch.bool)
            mask.view(n * n)[: n * n // 2].fill_(False)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        if kind == "sdpa-alibi-bias":
            i = torch.arange(n)
            bias = -(i[:, None] - i[None, :]).abs().float()
            return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        w = q @ k.transpose(-2, -1) * 0.3
        if kind == "hand-padding-mask":
            w = w + torch.where(pad, 0.0, float("-inf"))[:, None, None, :]
        elif kind == "hand-causal-weights-returned":
            w = w.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
            p = w.softmax(-1)
            return p @ v, p
        elif kind == "hand-dropout-training":
            return F.dropout(w.softmax(-1), p=0.5, training=True) @ v
        elif kind == "hand-cross-attention":
            w = q @ k[:, :, :6].transpose(-2, -1)
            return w.softmax(-1) @ v[:, :, :6]
        elif kind == "hand-inplace-masked_fill":
            w.masked_fill_(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
        elif kind == "hand-mask-value-not-minus-inf":
            w = w.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), -100.0)
        elif kind == "mha-need-weights":
            x = q.transpose(1, 2).flatten(2)
            return self.attn(x, x, x, need_weights=True)
        elif kind == "mha-padding-mask":
            x = q.transpose(1, 2).flatten(2)
            return self.attn(x, x, x, need_weights=False, key_padding_mask=~pad)[0]
        return w.softmax(-1) @ v


NEGATIVE = {
    "sdpa-padding-mask": "not a compile-time constant: depends on the graph input",
    "sdpa-window-off-by-one": "neither the causal mask, a sliding window nor empty",
    "sdpa-alibi-bias": "values other than 0 and -inf",
    "sdpa-mask-changed-through-view": "modified in place through the view",
    "hand-padding-mask": "not a compile-time constant",
    "hand-causal-weights-returned": "used outside the attention",
    "hand-dropout-training": "dropout is active",
    "hand-cross-attention": "query length 10 != key length 6",
    "hand-mask-value-not-minus-inf": "not -inf",
    "hand-inplace-masked_fill": "modified in place",
    "mha-need-weights": "need_weights=True",
    "mha-padding-mask": "key_padding_mask",
}


@pytest.mark.parametrize("kind", list(NEGATIVE))
def test_left_alone_with_reason_strict_error_and_untouched_output(kind):
    torch.manual_seed(0)
    model = Negative(kind)
    q, k, v = (torch.randn(2, 2, N, 4) for _ in range(3))
    pad = torch.ones(2, N, dtype=torch.bool)
    pad[0, -3:] = False
    report = explain(model, q, k, v, pad, policy=POLICY)
    (site,) = report.sites
    assert site.status == "left" and NEGATIVE[kind] in site.reason, str(report)
    assert report.diff == ""  # the graph is not touched
    torch._dynamo.reset()
    with pytest.raises(Exception, match="strict"):
        explain(model, q, k, v, pad, policy=STRICT)
    if kind == "hand-dropout-training":
        return  # random
    torch._dynamo.reset()
    out, eager = rewritten_eager(model)(q, k, v, pad), model(q, k, v, pad)
    for a, b in zip(*(x if isinstance(x, tuple) else (x,) for x in (out, eager))):
        assert torch.equal(a, b)
    if kind in ("sdpa-padding-mask", "hand-padding-mask"):  # and compiled: as the stock backend
        torch._dynamo.reset()
        out = torch.compile(model, backend="dilated", options={"policy": POLICY})(q, k, v, pad)
        assert counters["dilated"]["left"] == 1
        torch._dynamo.reset()
        stock = os.environ.get("DILATED_COMPILER", "inductor")  # what compiled the rewritten graph
        assert torch.equal(out, torch.compile(model, backend=stock)(q, k, v, pad))


def test_min_seq_len_and_counters_for_hand_written_and_mha():
    pol = {**POLICY, "defaults": {"min_seq_len": 64}}
    q = torch.randn(1, 2, N, 8)
    report = explain(Form("matmul-div-masked_fill"), q, q, q, policy=pol)
    assert "min_seq_len 64" in report.sites[0].reason
    torch._dynamo.reset()
    report = explain(MHA(True, "hint"), torch.randn(1, N, 16), policy=pol)
    assert "min_seq_len 64" in report.sites[0].reason


# ---------------------------------------------------------------- no new graphs or graph breaks


def _graph_counts(model, backend, *inputs, **options):
    torch._dynamo.reset()
    counters.clear()
    kw = {"options": options} if options else {}
    torch.compile(model, backend=backend, **kw)(*inputs)
    return counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())


class WithBreak(nn.Module):
    """A hand-written attention, then a graph break, then an SDPA attention."""

    def forward(self, q, k, v):
        x = Form("matmul-div-masked_fill")(q, k, v)
        torch._dynamo.graph_break()
        return F.scaled_dot_product_attention(x, k, v, is_causal=True)


def test_same_graphs_and_breaks_as_inductor():
    model = WithBreak()
    inputs = [torch.randn(1, 2, N, 8)] * 3
    dilated_counts = _graph_counts(model, "dilated", *inputs, policy=POLICY)
    assert counters["dilated"]["rewritten"] == 2 and dilated_counts == (2, 1)
    assert dilated_counts == _graph_counts(model, "inductor", *inputs)


@pytest.mark.parametrize("kind", ["matmul-mul-additive-fp32-softmax", "sdpa-gpt2-buffer"])
def test_block_sparse_rule_on_other_forms(kind):
    """The form finders feed every kind of rule: block-sparse on a hand-written site and on
    an SDPA site with a causal mask equals block_sparse_attention on the same q/k/v."""
    from dilated_compile.lowering.block_sparse.attention import block_sparse_attention

    _, causal, scale, _ = FORMS[kind]
    pattern = {"kind": "local_window", "window": 1}
    pol = {"version": 1, "rules": [{"match": "**", "attention": "block_sparse", "block_size": 4,
                                    "pattern": pattern}]}
    q, k, v = _qkv(n=13)
    report = explain(Form(kind), q, k, v, policy=pol)
    assert report.sites[0].status == "rewritten" and report.sites[0].attention.startswith("block_sparse")
    out = rewritten_eager(Form(kind), pol)(q, k, v)
    expected = block_sparse_attention(q, k, v, block_size=4, pattern=pattern, is_causal=causal, scale=scale)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5)
