"""A rule's `window: W` (the model's sliding window, stated), and the window a module declares.

Here, in one process: the policy key; a stated window checked against each site's mask
(a window of exactly W, or the plain mask where the length is at most W; anything else
leaves the site with the reason); what a site under a ring over several ranks would run
(`window_for`, given a shard); the window that HF attention modules and a module's own
`sliding_window` declare, read from the module objects of a compiled frame. Under real
process groups (the ring runs the stated window across ranks, a window the shard's mask
hides is warned about or raises, a wrong stated window raises on every rank):
`tests/ring_window_cases.py`. Policy errors: `tests/test_policy_errors.py`.
"""

from __future__ import annotations

import logging

import pytest
import torch

from dilated_compile import explain
from dilated_compile.frames import current_frame, resolving
from dilated_compile.passes.forms import find_sites
from dilated_compile.passes.stated_window import declared_window, unstated_window, window_for
from dilated_compile.policy import load_policy

from .models import WindowedAttention

N = 24


def _policy(window=None, attention="dense", **extra) -> dict:
    rule = {"match": "**", "attention": attention, **extra}
    if attention == "dilated":
        rule.update(segment_lengths=[8], dilation_rates=[1])
    if window is not None:
        rule["window"] = window
    return {"version": 1, "rules": [rule]}


def _qkv():
    torch.manual_seed(0)
    return [torch.randn(1, 2, N, 8) for _ in range(3)]


def test_window_key_is_read_described_and_in_the_digest() -> None:
    rule = load_policy(_policy(4096, ring={"layout": "zigzag"})).rules[0]
    assert rule.window == 4096
    assert rule.describe() == "rules[0] '**' -> dense ring=zigzag window=4096"
    assert load_policy(_policy(4096)).digest != load_policy(_policy()).digest
    assert load_policy(_policy()).rules[0].window is None
    # every kind takes it; a dilated rule without a ring only checks it
    assert load_policy(_policy(8, "dilated")).rules[0].window == 8
    assert load_policy(_policy(8, "dilated", ring=False)).rules[0].window == 8
    from_defaults = load_policy({"version": 1, "defaults": {"window": 16},
                                 "rules": [{"match": "a", "attention": "dense"},
                                           {"match": "b", "attention": "dense", "window": 8}]})
    assert [r.window for r in from_defaults.rules] == [16, 8]


# (model, stated window, status, what it became or fragments of the reason)
DECISIONS = {
    "window-equal": (WindowedAttention(5), 5, "rewritten", ["dense in a sliding window W=5"]),
    "window-differs": (WindowedAttention(5), 6, "left",
                       ["rules[0] '**' states window: 6, but its mask is a sliding window of 5", "`window: 5`"]),
    "causal-shorter-than-window": (WindowedAttention(30), 30, "rewritten", ["dense (unchanged)"]),
    "causal-longer-than-window": (WindowedAttention(30), 20, "left",
                                  ["states window: 20, but its mask on 24 positions is the causal mask, "
                                   "not a window of 20", "remove `window:`"]),
    "bidirectional-shorter-than-window": (WindowedAttention(30, causal=False), 24, "rewritten",
                                          ["dense (unchanged)"]),
    "bidirectional-longer-than-window": (WindowedAttention(30, causal=False), 23, "left",
                                         ["its mask on 24 positions is no mask, not a window of 23"]),
}


@pytest.mark.parametrize("case", DECISIONS)
def test_stated_window_against_the_sites_mask(case, caplog) -> None:
    """Over the whole sequence (no ring): a window of exactly W runs as before; the plain mask
    at a length <= W is what the window gives there; anything else is left with the reason,
    logged at WARNING."""
    model, window, status, fragments = DECISIONS[case]
    with caplog.at_level(logging.WARNING, logger="dilated_compile"):
        report = explain(model, *_qkv(), policy=_policy(window))
    (site,) = report.sites
    assert site.status == status, str(report)
    text = site.attention if status == "rewritten" else site.reason
    for fragment in fragments:
        assert fragment in text, text
    if status == "left":
        assert any(fragments[0] in w for w in report.warnings)


def test_left_site_under_strict_raises() -> None:
    with pytest.raises(Exception, match="strict.*\n.*states window: 20"):
        explain(WindowedAttention(30), *_qkv(), policy={**_policy(20), "strict": True})


def _sites_with_frames(model, policy):
    """Run `model` under Dynamo; for each site: (site, window_for over ranks, unstated_window),
    computed while the frame is being compiled (its module objects reachable)."""
    rule = load_policy(policy).rules[0]
    found = []

    def backend(gm, inputs, **_):
        with resolving(current_frame()):
            for site in find_sites(gm):
                found.append((site, window_for(site, rule, True), unstated_window(site, rule)))
        return gm.forward

    torch._dynamo.reset()
    torch.compile(model, backend=backend)(*_qkv())
    return found


def test_over_ranks_a_shard_shorter_than_the_stated_window_runs_it() -> None:
    """On a shard the plain mask hides the window: the stated one runs (across ranks); a
    module declaring a window of at least the shard's length is found when no rule states it."""
    ((site, (window, problem), unstated),) = _sites_with_frames(WindowedAttention(30), _policy(30))
    assert site.form == "sdpa+causal-mask" and site.window is None
    assert (window, problem) == (30, None) and unstated is None
    ((_, (window, problem), unstated),) = _sites_with_frames(WindowedAttention(30), _policy())
    assert (window, problem) == (None, None)
    assert unstated is not None and (unstated.window, unstated.source) == (30, "WindowedAttention.sliding_window")
    message = unstated.message()
    for fragment in ("attention in <root> (", "declares a sliding window (WindowedAttention.sliding_window = 30)",
                     "this rank's shard of 24 positions is the causal mask", "State the window in the rule: "
                     "`window: 30` (key j allowed for query i when i - W < j <= i, global positions)"):
        assert fragment in message, message
    ((_, (window, problem), _),) = _sites_with_frames(WindowedAttention(30), _policy(20))
    assert window is None and "this rank's shard of 24 positions is the causal mask" in problem
    # a window shorter than the shard shows in its mask: nothing hidden
    ((site, _, unstated),) = _sites_with_frames(WindowedAttention(20), _policy())
    assert site.window == 20 and unstated is None


class _CausalDeclared(torch.nn.Module):
    """`is_causal` attention in a module that declares a window of 30 (no mask to read)."""

    sliding_window = 30

    def forward(self, q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)


@pytest.mark.parametrize("bound", [None, 24], ids=["unbounded", "at-most-24"])
def test_symbolic_length_runs_a_stated_window_only_where_provably_within_it(bound) -> None:
    """A symbolic length is compared with the stated window without a guard: provably at most
    W (a dynamic dimension bounded by 24), the window runs over ranks; else the site is left.
    No warning is looked for at a symbolic length."""
    rule = load_policy(_policy(30)).rules[0]
    found = []

    def backend(gm, inputs, **_):
        with resolving(current_frame()):
            found.extend((s, window_for(s, rule, True), unstated_window(s, rule)) for s in find_sites(gm))
        return gm.forward

    torch._dynamo.reset()
    q, k, v = _qkv()
    for t in (q, k, v):
        torch._dynamo.mark_dynamic(t, 2, min=2, max=bound) if bound else torch._dynamo.mark_dynamic(t, 2)
    torch.compile(_CausalDeclared(), backend=backend)(q, k, v)
    ((site, (window, problem), unstated),) = found
    assert not isinstance(site.query_len, int) and unstated is None
    if bound:
        assert (window, problem) == (30, None)
    else:
        assert window is None and "not provably at most 30" in problem and "static shapes" in problem


def test_declared_window_of_hf_attention_modules() -> None:
    """HF attention modules built from their configs: Mistral's config window (every layer),
    Qwen2's per-layer `sliding_window` (None on full-attention layers), Llama's none."""
    transformers = pytest.importorskip("transformers")
    small = dict(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=32,
                 intermediate_size=64, vocab_size=64)

    def attentions(model_class, config_class, **kw):
        model = model_class(config_class(**small, **kw))
        return [declared_window(layer.self_attn) for layer in model.model.layers]

    windowed = ("config.sliding_window of MistralAttention")
    assert attentions(transformers.MistralForCausalLM, transformers.MistralConfig, sliding_window=8) == [
        (8, windowed)] * 2
    assert attentions(transformers.MistralForCausalLM, transformers.MistralConfig, sliding_window=None) == [None] * 2
    assert attentions(transformers.Qwen2ForCausalLM, transformers.Qwen2Config, sliding_window=8,
                      use_sliding_window=True, max_window_layers=1) == [None, (8, "Qwen2Attention.sliding_window")]
    assert attentions(transformers.LlamaForCausalLM, transformers.LlamaConfig) == [None] * 2


def test_hf_mistral_site_is_owned_by_the_module_declaring_the_window() -> None:
    """A compiled HF Mistral whose window is at least the sequence: its sites look causal, and
    each is traced to its MistralAttention object, whose config declares the window."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.MistralConfig(num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                     hidden_size=32, intermediate_size=64, vocab_size=64, sliding_window=16)
    model = transformers.MistralForCausalLM(cfg).eval()
    model.set_attn_implementation("sdpa")
    rule = load_policy(_policy()).rules[0]
    found = []

    def backend(gm, inputs, **_):
        with resolving(current_frame()):
            found.extend((s.module, s.window, unstated_window(s, rule)) for s in find_sites(gm))
        return gm.forward

    torch._dynamo.reset()
    torch.compile(model, backend=backend)(torch.randint(0, 64, (1, 12)))
    ((module, window, unstated),) = found
    assert module == "model.layers.0.self_attn" and window is None
    assert (unstated.window, unstated.source) == (16, "config.sliding_window of MistralAttention")


def test_example_policy_states_mistrals_window() -> None:
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "policies" / "mistral_ring.yaml"
    (rule,) = load_policy(str(path)).rules
    assert (rule.window, rule.attention, rule.ring.layout) == (4096, "dense", "zigzag")
    assert rule.matches("model.layers.3.self_attn")
