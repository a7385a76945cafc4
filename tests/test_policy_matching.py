"""What a rule's `match` names: globs on dotted module paths (the root module included) and `re:`."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._dynamo.utils import counters

import dilated_compile
from dilated_compile import dense_reference, dilated_reference, explain
from dilated_compile.policy import PolicyError, Rule, load_policy, parse_pattern

from .tolerance import budget

ROOT = ""  # the path of the top-level module, shown as <root>


@pytest.mark.parametrize(
    "pattern, path, expected",
    [
        # `*` and `**` alone name every module, the root included
        ("*", ROOT, True),
        ("**", ROOT, True),
        ("***", ROOT, True),
        ("**.**", ROOT, True),
        ("*", "attn", True),
        ("*", "h.3.attn", True),  # through its ancestor 'h'
        ("**", "h.3.attn", True),
        # anything else in a glob needs at least one component: never the root
        ("**.attn", ROOT, False),
        ("*.attn", ROOT, False),
        ("*.*", ROOT, False),
        ("*.**", ROOT, False),
        ("a.**", ROOT, False),
        ("?", ROOT, False),
        ("[!a]", ROOT, False),
        ("attn", ROOT, False),
        # `*` stays within one component, and is at least one character
        ("h.*.attn", "h.3.attn", True),
        ("h.*.attn", "h.3.x.attn", False),
        ("h.*.attn", "h.attn", False),
        ("*.attn", "h.attn", True),
        ("*.attn", "a.h.attn", False),
        ("h*", "h", False),
        # `**` crosses components; as a whole component it is zero or more of them
        ("**.attn", "attn", True),
        ("**.attn", "a.b.attn", True),
        ("a.**.attn", "a.attn", True),
        ("a.**.attn", "a.b.c.attn", True),
        ("a.**", "a", True),
        ("a.**", "ab", False),
        ("h.1**", "h.12.x", True),
        # a glob matches the path or any ancestor of it
        ("encoder.layer.0", "encoder.layer.0.attention.self", True),
        ("encoder.layer.0", "encoder.layer.01.attention", False),
        ("encoder.layer.0", "encoder", False),
        # `re:` is re.search on the path itself (no ancestors): the root only when the regex allows ''
        ("re:^$", ROOT, True),
        ("re:^", ROOT, True),
        ("re:.", ROOT, False),
        ("re:attn", ROOT, False),
        ("re:layer\\.1", "encoder.layer.12.x", True),
        ("re:attn$", "h.3.attn.proj", False),
    ],
)
def test_glob_and_regex_matching(pattern: str, path: str, expected: bool) -> None:
    assert Rule(match=pattern, attention="dense").matches(path) is expected


def test_rule_for_root_takes_the_first_rule_naming_it() -> None:
    policy = load_policy({
        "version": 1,
        "rules": [
            {"match": "**.attn", "attention": "dense"},
            {"match": "*", "attention": "dilated", "segment_lengths": [4], "dilation_rates": [2]},
        ],
    })
    assert policy.rule_for(ROOT).index == 1
    assert policy.rule_for("h.0.attn").index == 0
    assert policy.rule_for("h.0.mlp").index == 1


@pytest.mark.parametrize(
    "pattern, message",
    [
        ({"kind": "local_windw", "window": 1}, "pattern.kind: unknown value 'local_windw'; did you mean 'local_window'?"),
        ({"kind": "dilated", "window": 1}, "pattern.stride: missing (required for kind: dilated)"),
        ({"kind": "local_window", "window": -1}, "pattern.window: got -1; expected an integer >= 0"),
        ({"kind": "local_window", "window": 1, "stride": 2}, "pattern.stride: applies only to kind: dilated"),
        ({"kind": "local_window", "windows": 1}, "pattern.windows: unknown key; did you mean 'window'?"),
        ([1, 2], "pattern: got a list; expected a mapping like {kind: local_window, window: 2}"),
    ],
)
def test_parse_pattern_errors(pattern, message: str) -> None:
    with pytest.raises(PolicyError) as info:
        parse_pattern(pattern)
    assert str(info.value).startswith(message), str(info.value)


def test_parse_pattern_same_as_in_a_policy() -> None:
    mapping = {"kind": "global_local", "global_blocks": 2, "window": 1}
    rule = {"match": "x", "attention": "block_sparse", "block_size": 16, "pattern": mapping}
    policy = load_policy({"version": 1, "rules": [rule]})
    assert parse_pattern(mapping) == policy.rules[0].block_sparse.pattern
    bad = dict(mapping, window="1")
    with pytest.raises(PolicyError) as in_policy:
        load_policy({"version": 1, "rules": [dict(rule, pattern=bad)]})
    with pytest.raises(PolicyError) as alone:
        parse_pattern(bad, key="rules[0].pattern", file="<dict>")
    assert str(alone.value) == str(in_policy.value)


class RootAttention(nn.Module):
    """Attention in the top-level module's own forward: its site's module path is ''."""

    def __init__(self, dim: int = 16, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)

    def qkv_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        return q, k, v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv_heads(x)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


SEGMENTS, RATES = (8, 16), (1, 2)


def _root_policy(match: str) -> dict:
    rule = {"match": match, "attention": "dilated", "segment_lengths": list(SEGMENTS), "dilation_rates": list(RATES)}
    return {"version": 1, "rules": [rule]}


def test_star_rewrites_attention_in_the_root_modules_forward() -> None:
    torch._dynamo.reset()
    counters.clear()
    dilated_compile.clear_reports()
    torch.manual_seed(0)
    model = RootAttention()
    x = torch.randn(2, 32, 16)
    try:
        out = torch.compile(model, backend="dilated", options={"policy": _root_policy("*")})(x)
    finally:
        torch._dynamo.reset()
    (report,) = dilated_compile.reports()
    (site,) = report.sites
    assert (site.module, site.status, site.reason) == (ROOT, "rewritten", None)
    assert "<root>" in str(report)
    with torch.no_grad():
        q, k, v = model.qkv_heads(x)
    ref = dilated_reference(q, k, v, SEGMENTS, RATES, is_causal=True)
    err = (out.detach().double() - ref).abs().max().item()
    assert err <= budget(q, k, v, is_causal=True, ref=ref)
    # dense attention is far from the reference: a site left as it was would fail above
    assert (dense_reference(q, k, v, is_causal=True) - ref).abs().max().item() > 100 * budget(q, k, v, is_causal=True)


@pytest.mark.parametrize("match, status", [("**", "rewritten"), ("*.qkv", "left"), ("**.attn", "left")])
def test_which_globs_reach_the_root_site(match: str, status: str) -> None:
    report = explain(RootAttention(), torch.randn(1, 32, 16), policy=_root_policy(match))
    (site,) = report.sites
    assert (site.module, site.status) == (ROOT, status)


# --------------------------------------------------------------------------
# Matching
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "pattern, path, expected",
    [
        ("transformer.h.*.attn", "transformer.h.3.attn", True),
        ("transformer.h.*.attn", "transformer.h.11.attn", True),
        ("transformer.h.*.attn", "transformer.h.3.attn.c_attn", True),  # ancestor matches
        ("transformer.h.*.attn", "transformer.h.3.mlp", False),
        ("transformer.h.*.attn", "transformer.h.attn", False),  # * is one or more chars
        ("transformer.h.*.attn", "transformer.h.a.b.attn", False),  # * stays within a component
        ("transformer.h.*.attn", "transformer.h", False),
        ("transformer.h.*.attn", "xtransformer.h.3.attn", False),  # whole path
        ("*.attn", "h.attn", True),
        ("*.attn", "a.h.attn", False),
        ("encoder.layer.0", "encoder.layer.0.attention.self", True),
        ("encoder.layer.0", "encoder.layer.0", True),
        ("encoder.layer.0", "encoder.layer.01.attention", False),
        ("encoder.layer.0", "encoder.layer", False),
        ("**", "", True),
        ("**", "anything.at.all", True),
        ("**.attn", "a.b.c.attn", True),
        ("**.attn", "attn", True),
        ("**.attn", "a.b.c.attn_x", False),
        ("a.**.attn", "a.b.c.attn", True),
        ("a.**.attn", "a.attn", True),
        ("a.**.attn", "b.x.attn", False),
        ("a.**", "a", True),
        ("a.**", "a.b.c", True),
        ("a.**", "ab", False),
        ("h.1**", "h.12.x", True),
        ("h.?.attn", "h.3.attn", True),
        ("h.?.attn", "h.11.attn", False),
        ("h.[0-3].attn", "h.2.attn", True),
        ("h.[0-3].attn", "h.7.attn", False),
        ("h.[!0-3].attn", "h.7.attn", True),
        ("h.[!0-3].attn", "h.1.attn", False),
        ("h[.]x", "h.x", False),  # a class never matches a dot
        ("h+x(1)", "h+x(1)", True),  # regex characters in a glob are literal
        ("re:attn$", "transformer.h.3.attn", True),
        ("re:attn$", "transformer.h.3.attn.proj", False),  # '$' restricts to that path
        ("re:^encoder\\.layer\\.[0-3]\\.", "encoder.layer.2.attention.self", True),
        ("re:^encoder\\.layer\\.[0-3]\\.", "encoder.layer.5.attention.self", False),
        ("re:h\\.1", "x.h.12.attn", True),  # re.search: anywhere
        ("re:^$", "", True),
    ],
)
def test_matches(pattern: str, path: str, expected: bool) -> None:
    assert Rule(match=pattern, attention="dense").matches(path) is expected


def test_rule_for_first_match_wins() -> None:
    policy = load_policy({
        "version": 1,
        "rules": [
            {"match": "encoder.layer.0", "attention": "dense"},
            {"match": "encoder.**", "attention": "dilated", "segment_lengths": [4], "dilation_rates": [1]},
            {"match": "re:.", "attention": "dense", "min_seq_len": 7},
        ],
    })
    assert policy.rule_for("encoder.layer.0.attention.self").index == 0
    assert policy.rule_for("encoder.layer.1.attention.self").index == 1
    assert policy.rule_for("decoder.layer.1").index == 2
    assert policy.rule_for("") is None


def test_rule_for_none_when_nothing_matches() -> None:
    policy = load_policy({"version": 1, "rules": [{"match": "a.b", "attention": "dense"}]})
    assert policy.rule_for("a") is None
    assert policy.rule_for("c.a.b") is None
