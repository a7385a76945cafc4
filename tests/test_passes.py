"""Site finding, rule matching and the reasons a site is left (via explain: no Inductor)."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._dynamo.utils import counters

import dilated_compile
from dilated_compile import RewriteError, explain

from .models import TinyModel, dilated_rule, policy


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def _sites(report):
    return {s.module: s for s in report.sites}


def test_finds_every_site_with_module_path_and_shape():
    report = explain(TinyModel(heads=(5, 3)), torch.randn(2, 20, 16), policy=policy(dilated_rule()))
    sites = _sites(report)
    assert set(sites) == {"layers.0.attn", "layers.1.attn"}
    assert sites["layers.0.attn"].shape == (2, 5, 20, 8)
    assert sites["layers.1.attn"].form == "sdpa"
    assert all(s.status == "rewritten" and s.reason is None for s in report.sites)


@pytest.mark.parametrize("style", ["positional", "keyword"])
def test_calling_styles_and_scale_are_honoured(style):
    """Positional and keyword SDPA calls are found; `scale` and `is_causal` carry over."""
    torch.manual_seed(0)
    model = TinyModel(heads=(4,), style=style, scale=0.2, is_causal=False).eval()
    x = torch.randn(1, 24, 16)
    report = explain(model, x, policy=policy(dilated_rule(seg=(24,), rates=(1,))))
    assert report.sites[0].status == "rewritten"
    assert "scale = 0.2" in report.diff and "is_causal = False" in report.diff
    # one pattern covering the sequence with rate 1 is ordinary attention: same output
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="dilated",
                             options={"policy": policy(dilated_rule(seg=(24,), rates=(1,)))})
    torch.testing.assert_close(compiled(x), model(x), atol=1e-5, rtol=1e-5)


def test_root_module_sdpa_has_empty_path():
    def f(q):
        return F.scaled_dot_product_attention(q, q, q)

    report = explain(f, torch.randn(1, 2, 8, 4), policy=policy(dilated_rule(match="**")))
    assert report.sites[0].module == "" and report.sites[0].status == "rewritten"


def test_first_matching_rule_wins():
    pol = policy(
        {"match": "layers.0.attn", "attention": "dense"},
        dilated_rule(match="layers.*.attn", head_split="longnet"),
    )
    sites = _sites(explain(TinyModel(), torch.randn(1, 20, 16), policy=pol))
    assert sites["layers.0.attn"].attention == "dense (unchanged)"
    assert sites["layers.0.attn"].rule.startswith("rules[0]")
    assert sites["layers.1.attn"].attention.startswith("dilated longnet")


def test_regex_rule():
    pol = policy(dilated_rule(match=r"re:^layers\.1\."))
    sites = _sites(explain(TinyModel(), torch.randn(1, 20, 16), policy=pol))
    assert sites["layers.0.attn"].status == "left" and sites["layers.1.attn"].status == "rewritten"


def test_min_seq_len_leaves_short_sequences_with_reason():
    pol = policy(dilated_rule(), min_seq_len=64)
    report = explain(TinyModel(), torch.randn(1, 20, 16), policy=pol)
    for s in report.sites:
        assert s.status == "left" and "key length 20 < min_seq_len 64" in s.reason
    pol_strict = policy(dilated_rule(), strict=True, min_seq_len=64)
    explain(TinyModel(), torch.randn(1, 20, 16), policy=pol_strict)  # not an error: policy's own choice


class Custom(nn.Module):
    """One SDPA call that cannot be rewritten exactly, picked by `kind`."""

    def __init__(self, kind):
        super().__init__()
        self.kind = kind

    def forward(self, q, k, v):
        if self.kind == "mask":
            n = q.shape[-2]
            pad = torch.ones(q.shape[0], 1, 1, n, dtype=torch.bool)
            pad[..., -3:] = False
            return F.scaled_dot_product_attention(q, k, v, attn_mask=pad)
        if self.kind == "cross":
            return F.scaled_dot_product_attention(q, k[:, :, :5], v[:, :, :5])
        if self.kind == "dropout":
            return F.scaled_dot_product_attention(q, k, v, dropout_p=0.1 if self.training else 0.0)
        if self.kind == "gqa":
            return F.scaled_dot_product_attention(q, k[:, :2], v[:, :2], enable_gqa=True, is_causal=True)
        raise ValueError(self.kind)


@pytest.mark.parametrize(
    "kind,reason",
    [
        ("mask", "attn_mask"),
        ("cross", "query length 12 != key length 5"),
        ("dropout", "dropout is active"),
    ],
)
def test_left_alone_with_reason_and_unchanged_output(kind, reason):
    torch.manual_seed(0)
    module = Custom(kind).train()
    q, k, v = (torch.randn(1, 4, 12, 8) for _ in range(3))
    pol = policy(dilated_rule(match="**"))
    report = explain(module, q, k, v, policy=pol)
    (site,) = report.sites
    assert site.status == "left" and reason in site.reason
    assert any("targeted by rules[0] but left" in w for w in report.warnings)
    if kind != "dropout":  # dropout is random
        torch._dynamo.reset()
        out = torch.compile(module, backend="dilated", options={"policy": pol})(q, k, v)
        assert torch.equal(out, module(q, k, v))
    torch._dynamo.reset()
    with pytest.raises(Exception, match="strict") as info:
        explain(module, q, k, v, policy=policy(dilated_rule(match="**"), strict=True))
    assert reason in str(info.value)


def test_strict_error_type_from_backend():
    module = Custom("mask")
    q = torch.randn(1, 4, 12, 8)
    with pytest.raises(Exception) as info:
        torch.compile(module, backend="dilated",
                      options={"policy": policy(dilated_rule(match="**"), strict=True)})(q, q, q)
    assert isinstance(info.value.__cause__ or info.value, (RewriteError, Exception))
    assert "strict" in str(info.value) and "attn_mask" in str(info.value)


def test_dropout_in_eval_mode_is_rewritten():
    module = Custom("dropout").eval()
    q = torch.randn(1, 4, 12, 8)
    report = explain(module, q, q, q, policy=policy(dilated_rule(match="**")))
    assert report.sites[0].status == "rewritten"


def test_rule_matching_no_site_is_warned():
    pol = policy(dilated_rule(), dilated_rule(match="encoder.**"))
    with pytest.warns(UserWarning, match="rules\\[1\\] 'encoder.\\*\\*' matches no attention site"):
        report = explain(TinyModel(), torch.randn(1, 20, 16), policy=pol)
    assert report.warnings == ["rules[1] 'encoder.**' matches no attention site"]
    assert "matches no attention site" in str(report)


def test_explain_does_not_count_or_record():
    dilated_compile.clear_reports()
    explain(TinyModel(), torch.randn(1, 20, 16), policy=policy(dilated_rule()))
    assert dilated_compile.reports() == [] and counters["dilated"]["rewritten"] == 0


def test_grouped_query_attention_is_rewritten_exactly():
    """enable_gqa: each key/value head serves H/Hkv query heads; the rewrite
    repeats them and is then exactly dilated attention of the repeated heads."""
    from dilated_compile import dilated_attention

    module = Custom("gqa")
    q, k, v = (torch.randn(1, 4, 12, 8) for _ in range(3))
    pol = policy(dilated_rule(match="**", seg=(4, 8), rates=(1, 2), head_split="longnet"))
    report = explain(module, q, k, v, policy=pol)
    assert report.sites[0].status == "rewritten"
    added = [l for l in report.diff.splitlines() if l.startswith("+") and ".repeat_interleave(" in l]
    assert len(added) == 2
    torch._dynamo.reset()
    out = torch.compile(module, backend="dilated", options={"policy": pol})(q, k, v)
    kr, vr = (t[:, :2].repeat_interleave(2, dim=1) for t in (k, v))
    expected = dilated_attention(q, kr, vr, (4, 8), (1, 2), head_split="longnet", is_causal=True)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
