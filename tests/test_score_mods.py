"""Attention whose scores are changed between `q @ kᵀ` and the softmax (soft-capping,
position biases, score functions) is listed and left with the reason, never invisible;
a use of the scores that nothing reads does not keep an attention from its rewrite.

Written in the ways that break finders: scale by multiply or divide, ops as methods or
functions, the key transposed by `transpose` or before the head split by `permute`,
`einsum` in either layout, 3-D `bmm`.
"""

import logging
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._dynamo.utils import counters

from dilated_compile import dilated_reference, explain

from . import models
from .tolerance import assert_within

SEG, RATES, SPLIT = (4, 8), (1, 2), "longnet"
POLICY = {"version": 1, "rules": [{"match": "**", "attention": "dilated", "segment_lengths": list(SEG),
                                   "dilation_rates": list(RATES), "head_split": SPLIT}]}
STRICT = {**POLICY, "strict": True}
B, H, N, D = 2, 2, 10, 4
PATH = "blocks.0.attn"


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def rewritten_eager(model, policy=POLICY):
    """`model` compiled with the rewrite (this file's policy by default), run eagerly."""
    return models.rewritten_eager(model, policy)


def scores_of(q, k, product):
    """q @ kᵀ written as `product`; (scores, how to multiply weights by v)."""
    b, h, n, d = q.shape
    if product == "matmul":
        return q @ k.transpose(-2, -1), lambda p, v: p @ v
    if product == "torch.matmul-permute":
        return torch.matmul(q, k.permute(0, 1, 3, 2)), lambda p, v: torch.matmul(p, v)
    if product == "key-transposed-before-split":  # old GPT-2: the key made (b, h, d, n) from (b, n, h, d)
        return q @ k.transpose(1, 2).permute(0, 2, 3, 1), lambda p, v: p @ v
    if product == "einsum":
        return torch.einsum("bhqd,bhkd->bhqk", q, k), lambda p, v: torch.einsum("bhqk,bhkd->bhqd", p, v)
    if product == "einsum-bshd":  # (batch, seq, heads, dim) operands
        w = torch.einsum("bqhd,bkhd->bhqk", q.transpose(1, 2), k.transpose(1, 2))
        return w, lambda p, v: torch.einsum("bhqk,bkhd->bqhd", p, v.transpose(1, 2)).transpose(1, 2)
    if product == "bmm":  # (batch * heads, seq, dim)
        w = torch.bmm(q.reshape(b * h, n, d), k.reshape(b * h, n, d).transpose(1, 2))
        return w, lambda p, v: torch.bmm(p, v.reshape(b * h, n, d)).view(b, h, n, d)
    raise ValueError(product)


def modified(w, mod, style):
    """The scores `w` changed by `mod`, with ops called as methods or as functions."""
    method = style == "method"
    if mod == "softcap":  # Gemma 2
        return (w / 30.0).tanh() * 30.0 if method else torch.tanh(w / 30.0) * 30.0
    if mod == "relu":
        return w.relu() if method else torch.relu(w)
    if mod == "score-function":
        return w * w.sigmoid() if method else w * torch.sigmoid(w)
    if mod == "clamp":
        return w.clamp(-3.0, 3.0) if method else torch.clamp(w, -3.0, 3.0)
    raise ValueError(mod)


# what the reason names, by score modification (one of them)
MOD_NAMES = {"softcap": ("tanh",), "relu": ("relu",), "score-function": ("sigmoid", "function of the scores"),
             "clamp": ("clamp",)}


class ScoreMod(nn.Module):
    def __init__(self, mod, product, scale_op, style):
        super().__init__()
        self.mod, self.product, self.scale_op, self.style = mod, product, scale_op, style

    def forward(self, q, k, v):
        w, times_v = scores_of(q, k, self.product)
        w = w * q.shape[-1] ** -0.5 if self.scale_op == "mul" else w / math.sqrt(q.shape[-1])
        w = modified(w, self.mod, self.style)
        p = w.softmax(-1) if self.style == "method" else F.softmax(w, dim=-1)
        return times_v(p, v)


class Block(nn.Module):
    def __init__(self, attn):
        super().__init__()
        self.attn = attn

    def forward(self, q, k, v, *rest):
        return self.attn(q, k, v, *rest)


class Model(nn.Module):
    """The attention under a known module path (blocks.0.attn)."""

    def __init__(self, attn):
        super().__init__()
        self.blocks = nn.ModuleList([Block(attn)])

    def forward(self, q, k, v, *rest):
        return self.blocks[0](q, k, v, *rest)


def _qkv(dtype=torch.float32):
    torch.manual_seed(0)
    return [torch.randn(B, H, N, D, dtype=dtype) for _ in range(3)]


def _left(model, *inputs, policy=POLICY):
    """The model's one site, checked to be left under `policy` with the graph untouched."""
    report = explain(model, *inputs, policy=policy)
    assert len(report.sites) == 1, str(report)
    (site,) = report.sites
    assert (site.module, site.status) == (PATH, "left"), str(report)
    assert report.diff == "", str(report)
    return site


PRODUCTS = ["matmul", "torch.matmul-permute", "key-transposed-before-split", "einsum", "einsum-bshd", "bmm"]


@pytest.mark.parametrize("style", ["method", "function"])
@pytest.mark.parametrize("scale_op", ["mul", "div"])
@pytest.mark.parametrize("product", PRODUCTS)
@pytest.mark.parametrize("mod", ["softcap", "relu"])
def test_modified_scores_are_listed_and_left(mod, product, scale_op, style):
    model = Model(ScoreMod(mod, product, scale_op, style))
    q, k, v = _qkv()
    site = _left(model, q, k, v)
    assert "modified before the softmax" in site.reason, site.reason
    assert any(name in site.reason for name in MOD_NAMES[mod]), site.reason
    torch._dynamo.reset()
    assert torch.equal(rewritten_eager(model)(q, k, v), model(q, k, v))


@pytest.mark.parametrize("product", ["matmul", "einsum", "bmm"])
@pytest.mark.parametrize("mod", ["score-function", "clamp"])
def test_any_function_of_the_scores_is_listed_and_left(mod, product):
    model = Model(ScoreMod(mod, product, "mul", "function"))
    site = _left(model, *_qkv())
    assert "modified before the softmax" in site.reason, site.reason
    assert any(name in site.reason for name in MOD_NAMES[mod]), site.reason


@pytest.mark.parametrize("product", ["key-transposed-before-split", "einsum-bshd"])
def test_products_in_other_layouts_say_so(product):
    """A key transposed other than by transpose(-2, -1), an einsum in another layout: the reason says."""
    site = _left(Model(ScoreMod("softcap", product, "mul", "method")), *_qkv())
    expected = "permute(0, 2, 3, 1)" if product.startswith("key") else "einsum('bqhd,bkhd->bhqk')"
    assert expected in site.reason, site.reason


def test_strict_policy_raises_for_a_soft_capped_site():
    with pytest.raises(Exception, match=r"strict[\s\S]*blocks\.0\.attn[\s\S]*tanh"):
        explain(Model(ScoreMod("softcap", "matmul", "div", "method")), *_qkv(), policy=STRICT)


class Gemma2Attention(nn.Module):
    """Gemma 2's eager attention: soft-capped scores, causal mask added, fp32 softmax, dropout."""

    def __init__(self, softcap=50.0):
        super().__init__()
        self.softcap = softcap

    def forward(self, q, k, v):
        n = q.shape[-2]
        causal = torch.full((n, n), torch.finfo(q.dtype).min).triu(1)[None, None]
        w = torch.matmul(q, k.transpose(2, 3)) * q.shape[-1] ** -0.5
        w = w / self.softcap
        w = torch.tanh(w)
        w = w * self.softcap
        w = w + causal
        w = F.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype)
        w = F.dropout(w, p=0.1, training=False)
        return torch.matmul(w, v)


def test_gemma2_soft_capping_through_the_backend(caplog):
    """Listed and left with the reason by explain and by torch.compile (a WARNING the user sees);
    the compiled model computes what the uncompiled one does."""
    model = Model(Gemma2Attention())
    q, k, v = _qkv()
    site = _left(model, q, k, v)
    assert "modified before the softmax (tanh)" in site.reason and "soft-capping" in site.reason
    torch._dynamo.reset()
    with caplog.at_level(logging.WARNING, logger="dilated_compile"):
        out = torch.compile(model, backend="dilated", options={"policy": POLICY})(q, k, v)
    assert counters["dilated"]["left"] == 1 and counters["dilated"]["rewritten"] == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any(PATH in w and "tanh" in w for w in warnings), warnings
    torch.testing.assert_close(out, model(q, k, v), atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------- additive biases and masks


class Biased(nn.Module):
    """Scores with an additive bias or mask, picked by `kind`."""

    def __init__(self, kind, product="matmul", scale_op="mul"):
        super().__init__()
        self.kind, self.product, self.scale_op = kind, product, scale_op
        self.slopes = nn.Parameter(torch.tensor([2.0 ** -(i + 1) for i in range(H)]))
        self.relative = nn.Embedding(2 * N, H)  # T5: a learned bias per head and relative position

    def bias(self, q, extra):
        n = q.shape[-2]
        i = torch.arange(n)
        distance = (i[None, :] - i[:, None]).float()
        if self.kind == "alibi-constant":  # slopes fixed: a constant the pass evaluates
            return torch.tensor([0.5, 0.25])[None, :, None, None] * -distance.abs()
        if self.kind == "alibi-parameter":
            return self.slopes[None, :, None, None] * -distance.abs()
        if self.kind == "t5-relative":
            buckets = (i[None, :] - i[:, None]).clamp(-N + 1, N - 1) + N - 1
            return self.relative(buckets).permute(2, 0, 1)[None]
        if self.kind == "bert-padding":  # BERT: (1 - mask) * -10000 from the attention mask input
            return (1.0 - extra[:, None, None, :].float()) * -10000.0
        if self.kind == "hf-4d-mask-input":  # HF eager_attention_forward: a 4-D float mask argument
            return extra
        raise ValueError(self.kind)

    def forward(self, q, k, v, extra):
        w, times_v = scores_of(q, k, self.product)
        w = w * 0.5 if self.scale_op == "mul" else w / 2.0
        bias = self.bias(q, extra)
        if self.product == "bmm":
            bias = bias.expand(q.shape[0], H, N, N).reshape(-1, N, N)
        return times_v((w + bias).softmax(-1), v)


BIASES = {
    "alibi-constant": "values other than 0 and -inf",
    "alibi-parameter": "not a compile-time constant: depends on the graph input",
    "t5-relative": "T5's relative position bias",
    "bert-padding": "(a padding mask?)",
    "hf-4d-mask-input": "(a padding mask?)",
}


def _extra(kind):
    if kind == "bert-padding":
        pad = torch.ones(B, N, dtype=torch.long)
        pad[0, -3:] = 0
        return pad
    if kind == "hf-4d-mask-input":
        return torch.zeros(B, 1, N, N).masked_fill(torch.ones(N, N, dtype=torch.bool).triu(1), -1e9)
    return torch.zeros(())


@pytest.mark.parametrize("scale_op", ["mul", "div"])
@pytest.mark.parametrize("product", ["matmul", "einsum", "bmm"])
@pytest.mark.parametrize("kind", list(BIASES))
def test_additive_biases_are_listed_and_left(kind, product, scale_op):
    model = Model(Biased(kind, product, scale_op))
    q, k, v = _qkv()
    extra = _extra(kind)
    site = _left(model, q, k, v, extra)
    assert BIASES[kind] in site.reason, site.reason
    torch._dynamo.reset()
    assert torch.equal(rewritten_eager(model)(q, k, v, extra), model(q, k, v, extra))


class BloomAttention(nn.Module):
    """BLOOM: ALiBi added by baddbmm on (batch * heads, seq, dim), then a view to 4-D."""

    def forward(self, q, k, v, alibi):
        b, h, n, d = q.shape
        w = alibi.baddbmm(batch1=q.reshape(b * h, n, d), batch2=k.reshape(b * h, n, d).transpose(-1, -2),
                          beta=1.0, alpha=d ** -0.5)
        w = w.view(b, h, n, n)
        p = F.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype)
        return torch.bmm(p.view(b * h, n, n), v.reshape(b * h, n, d)).view(b, h, n, d)


def test_bloom_baddbmm_bias_is_listed_and_left():
    alibi = -torch.arange(N).float()[None, None, :] * torch.tensor([0.5, 0.25] * B)[:, None, None]
    site = _left(Model(BloomAttention()), *_qkv(), alibi)
    assert "baddbmm" in site.reason and "bias" in site.reason, site.reason


class HeadMasked(nn.Module):
    """The weights multiplied by a head mask after the softmax (HF's head_mask)."""

    def forward(self, q, k, v, head_mask):
        p = (q @ k.transpose(-2, -1) * 0.5).softmax(-1)
        return (p * head_mask[None, :, None, None]) @ v


def test_weights_changed_after_the_softmax_are_listed_and_left():
    site = _left(Model(HeadMasked()), *_qkv(), torch.tensor([1.0, 0.0]))
    assert "changed after the softmax (mul)" in site.reason, site.reason


class SdpaBias(nn.Module):
    """SDPA with an additive float bias: constant ALiBi, or T5's bias from an embedding."""

    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.relative = nn.Embedding(2 * N, H)

    def forward(self, q, k, v):
        i = torch.arange(q.shape[-2])
        if self.kind == "alibi-constant":
            bias = -(i[None, :] - i[:, None]).abs().float()
        else:
            bias = self.relative(i[None, :] - i[:, None] + N - 1).permute(2, 0, 1)[None]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)


@pytest.mark.parametrize("kind,reason", [("alibi-constant", "values other than 0 and -inf"),
                                         ("t5-relative", "T5's relative position bias")])
def test_sdpa_with_an_additive_bias_is_listed_and_left(kind, reason):
    q, k, v = _qkv()
    site = _left(Model(SdpaBias(kind)), q, k, v)
    assert site.form == "sdpa" and "attn_mask" in site.reason and reason in site.reason, site.reason


# ---------------------------------------------------------------- uses that nothing reads


class DeadUses(nn.Module):
    """Hand-written causal attention whose scores (and weights) are also copied into values
    that nothing reads."""

    def __init__(self, product="matmul", scale_op="div", style="method"):
        super().__init__()
        self.product, self.scale_op, self.style = product, scale_op, style

    def forward(self, q, k, v):
        n = q.shape[-2]
        w, times_v = scores_of(q, k, self.product)
        w = w / math.sqrt(q.shape[-1]) if self.scale_op == "div" else w * q.shape[-1] ** -0.5
        unused = w.clone() if self.style == "method" else torch.clone(w)  # noqa: F841
        unused_too = (unused * 2).sum()  # noqa: F841
        mask = torch.ones(n, n, dtype=torch.bool).triu(1)
        if self.product == "bmm":
            mask = mask[None]
        w = w.masked_fill(mask, float("-inf"))
        p = w.softmax(-1)
        unused_weights = p.detach().clone()  # noqa: F841
        return times_v(p, v)


@pytest.mark.parametrize("style", ["method", "function"])
@pytest.mark.parametrize("scale_op", ["mul", "div"])
@pytest.mark.parametrize("product", ["matmul", "torch.matmul-permute", "einsum"])
def test_dead_copy_of_the_scores_does_not_block_the_rewrite(product, scale_op, style):
    model = Model(DeadUses(product, scale_op, style))
    q, k, v = _qkv(torch.float64)
    report = explain(model, q, k, v, policy=POLICY)
    (site,) = report.sites
    assert (site.module, site.status, site.is_causal) == (PATH, "rewritten", True), str(report)
    after = "\n".join(g.after for g in report.graphs)
    code = [line for line in after.splitlines() if not line.strip().startswith("#")]  # not file paths
    assert not any("clone" in line for line in code), after  # the dead copies went with the attention
    torch._dynamo.reset()
    out = rewritten_eager(model)(q, k, v)
    ref = dilated_reference(q, k, v, SEG, RATES, head_split=SPLIT, is_causal=True)
    assert_within(out, ref, q, k, v, is_causal=True)


def test_dead_copy_through_the_backend():
    model = Model(DeadUses())
    q, k, v = _qkv()
    out = torch.compile(model, backend="dilated", options={"policy": POLICY})(q, k, v)
    assert counters["dilated"]["rewritten"] == 1 and counters["dilated"]["left"] == 0
    ref = dilated_reference(*(t.double() for t in (q, k, v)), SEG, RATES, head_split=SPLIT, is_causal=True)
    assert_within(out, ref, q, k, v, is_causal=True)


class EffectfulUse(nn.Module):
    """A copy of the scores changed in place: an op with an effect, kept, so the scores are
    used outside the attention."""

    def forward(self, q, k, v):
        w = q @ k.transpose(-2, -1) * 0.5
        w.clone().mul_(2.0)
        return w.softmax(-1) @ v


def test_a_use_with_an_effect_still_blocks():
    site = _left(Model(EffectfulUse()), *_qkv())
    assert "used outside the attention" in site.reason, site.reason


class SharedDeadUse(nn.Module):
    """Two attentions whose scores feed one value that nothing reads."""

    def forward(self, q, k, v):
        w1, w2 = q @ k.transpose(-2, -1), k @ q.transpose(-2, -1)
        unused = w1.clone() + w2.clone()  # noqa: F841
        return w1.softmax(-1) @ v + w2.softmax(-1) @ v


def test_dead_use_shared_by_two_rewritten_sites():
    q, k, v = _qkv(torch.float64)
    report = explain(Model(SharedDeadUse()), q, k, v, policy=POLICY)
    assert [s.status for s in report.sites] == ["rewritten", "rewritten"], str(report)
    torch._dynamo.reset()
    out = rewritten_eager(Model(SharedDeadUse()))(q, k, v)
    ref = (dilated_reference(q, k, v, SEG, RATES, head_split=SPLIT, scale=1.0)
           + dilated_reference(k, q, v, SEG, RATES, head_split=SPLIT, scale=1.0))
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)


class EinsumWeightsReturned(nn.Module):
    def forward(self, q, k, v):
        p = torch.einsum("bhqd,bhkd->bhqk", q, k).softmax(-1)
        return torch.einsum("bhqk,bhkd->bhqd", p, v), p


def test_einsum_weights_returned_are_listed_and_left():
    site = _left(Model(EinsumWeightsReturned()), *_qkv())
    assert site.form == "einsum-softmax" and "weights are used outside the attention" in site.reason, site.reason


class SoftMixture(nn.Module):
    """softmax(tanh(x @ Wᵀ)) @ E: a projection on the model's weights, not attention over a sequence."""

    def __init__(self):
        super().__init__()
        self.w, self.e = nn.Parameter(torch.randn(5, D)), nn.Parameter(torch.randn(5, D))

    def forward(self, x):
        return torch.tanh(x @ self.w.t()).softmax(-1) @ self.e


def test_softmax_over_a_projection_is_not_a_site():
    report = explain(SoftMixture(), torch.randn(B, N, D), policy=POLICY)
    assert report.sites == [], str(report)
