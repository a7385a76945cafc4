"""The compiled model in real training loops: activation checkpointing (HF's, and
torch.utils.checkpoint with and without reentrancy), max-autotune, the long-context example.
Lengths that change between steps: tests/test_dynamic_lengths.py; caches:
tests/test_compile_caches.py."""

import copy
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch._dynamo.utils import counters

import dilated_compile
from dilated_compile import dilated_reference

from examples.train_fsdp_ring import empty_cache_kwargs
from .models import CheckpointedBlocks, TinyModel, dilated_rule, policy, restore
from .training_common import RATES, ROOT, SEG, _reference_model, fresh_dynamo  # noqa: F401 (autouse fixture)


# transformers keeps an explicit causal mask while compiling on torch before 2.13, so an HF
# model's mask reaches a frame's graph as an input and its sites are left with that reason
# (with a warning): see docs/limitations.md.
hf_mask_is_constant = pytest.mark.skipif(
    tuple(int(x) for x in torch.__version__.split(".")[:2]) < (2, 13),
    reason="transformers passes its causal mask as a graph input on torch < 2.13 (sites left, warned)",
)


# ---------------------------------------------------------------- activation checkpointing


HF_SEG, HF_RATES = (16, 32), (1, 2)
HF_POLICY = {"version": 1, "rules": [{"match": "**", "attention": "dilated", "segment_lengths": list(HF_SEG),
                                      "dilation_rates": list(HF_RATES), "head_split": "longnet"}]}
HF_SITES = [f"model.layers.{i}.self_attn" for i in range(2)]


def _tiny_llama():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   hidden_size=64, intermediate_size=128, vocab_size=128,
                                   max_position_embeddings=256)
    model = transformers.LlamaForCausalLM(cfg)
    model.set_attn_implementation("sdpa")
    return transformers, cfg, model


def _hf_reference_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                            is_causal=None, **kwargs):
    """HF's attention interface computing the policy's dilated attention in float64."""
    if attention_mask is not None:
        raise AssertionError("this test feeds no padding mask and HF keeps is_causal")
    groups = query.shape[1] // key.shape[1]
    key, value = (t.repeat_interleave(groups, dim=1) for t in (key, value))
    out = dilated_reference(query.double(), key.double(), value.double(), HF_SEG, HF_RATES,
                            head_split="longnet", is_causal=True, scale=scaling)
    return out.to(query.dtype).transpose(1, 2).contiguous(), None


@hf_mask_is_constant
def test_hf_gradient_checkpointing_rewrites_sites_and_keeps_gradients():
    """HF gradient_checkpointing_enable() on a tiny Llama: Dynamo traces the checkpointed
    layers whole (no graph break, in particular none at transformers' "caching is
    incompatible with gradient checkpointing" logger.warning_once), both layers'
    attention is rewritten, and two optimizer steps give the losses and gradients of
    the same model with the float64 dilated reference as its attention.

    An empty cache object is passed so that HF keeps `is_causal` instead of building
    an explicit causal mask (which it does with use_cache=False); dropping that cache is
    what makes each checkpointed layer log its warning.
    """
    transformers, cfg, checkpointed = _tiny_llama()
    torch.manual_seed(0)
    reference = copy.deepcopy(checkpointed)
    transformers.AttentionInterface.register("dilated_reference_test", _hf_reference_attention)
    reference.set_attn_implementation("dilated_reference_test")
    checkpointed.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert checkpointed.is_gradient_checkpointing
    compiled = torch.compile(checkpointed.train(), backend="dilated", options={"policy": HF_POLICY})
    models = (compiled, reference.train())
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (checkpointed, reference)]
    ids = torch.randint(0, 128, (2, 70))
    for _ in range(2):
        losses = []
        for m in models:
            loss = m(ids, labels=ids, **empty_cache_kwargs(m, cfg)).loss
            loss.backward()
            losses.append(loss)
        torch.testing.assert_close(losses[0], losses[1], atol=1e-5, rtol=1e-5)
        for (name, a), b in zip(checkpointed.named_parameters(), reference.parameters()):
            torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-4, msg=name)
        for opt in opts:
            opt.step()
            opt.zero_grad()
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == 1
    sites = [s for r in dilated_compile.reports() for s in r.sites]
    assert [s.module for s in sites] == HF_SITES, [str(r) for r in dilated_compile.reports()]
    assert all(s.status == "rewritten" for s in sites) and counters["dilated"]["left"] == 0


_IMPORT_ORDER_PROBE = textwrap.dedent(
    """
    import json, torch
    from torch._dynamo.utils import counters
    import dilated_compile  # before transformers, which adds Logger.warning_once at import
    from examples.train_fsdp_ring import empty_cache_kwargs
    from tests.test_training import HF_POLICY, _tiny_llama
    transformers, cfg, model = _tiny_llama()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    compiled = torch.compile(model.train(), backend="dilated", options={"policy": HF_POLICY})
    ids = torch.randint(0, 128, (1, 40))
    compiled(ids, labels=ids, **empty_cache_kwargs(model, cfg))
    print(json.dumps({"breaks": dict(counters["graph_break"]), "rewritten": counters["dilated"]["rewritten"]}))
    """
)


@hf_mask_is_constant
def test_hf_gradient_checkpointing_compiles_whole_when_imported_before_transformers():
    """The Dynamo settings for HF's checkpointing layer take effect whatever the import
    order: dilated_compile imported before transformers, the layers still trace whole."""
    pytest.importorskip("transformers")
    res = subprocess.run([sys.executable, "-c", _IMPORT_ORDER_PROBE], cwd=ROOT, capture_output=True,
                         text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert res.returncode == 0, res.stderr[-4000:]
    import json

    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got == {"breaks": {}, "rewritten": 2}, got


def test_checkpointing_with_dynamic_lengths_trains_like_reference():
    """torch.utils.checkpoint around blocks whose sites have a symbolic length:
    the custom op is recomputed in the backward, gradients equal the reference."""
    torch.manual_seed(0)
    model = CheckpointedBlocks(heads=(4, 3))
    reference, saved = _reference_model(model, "longnet")
    pol = policy(dilated_rule(match="**.attn", seg=SEG, rates=RATES, head_split="longnet"))
    compiled = torch.compile(model, backend="dilated", options={"policy": pol}, dynamic=True)
    try:
        for n in (29, 48):
            x = torch.randn(2, n, 16)
            loss_c, loss_r = compiled(x).pow(2).mean(), reference(x).pow(2).mean()
            loss_c.backward()
            loss_r.backward()
            torch.testing.assert_close(loss_c, loss_r, atol=1e-5, rtol=1e-5)
            for (name, a), b in zip(model.named_parameters(), reference.parameters()):
                torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-4, msg=name)
                a.grad = b.grad = None
    finally:
        restore(saved)
    # the backend may run twice for the first call (Dynamo retraces once a symbolic
    # float attribute such as the dropout probability is guarded): count the last graph
    last = dilated_compile.reports()[-1].sites
    assert len(last) == 2 and all(s.status == "rewritten" and "dynamic length" in s.attention for s in last)
    assert counters["dilated"]["left"] == 0 and counters["stats"]["unique_graphs"] == 1


# ---------------------------------------------------------------- max-autotune


@pytest.mark.inductor
def test_max_autotune_on_cpu_compiles_and_matches_reference():
    torch.manual_seed(0)
    model = TinyModel(heads=(4,))
    reference, saved = _reference_model(model, "groups")
    pol = policy(dilated_rule(seg=SEG, rates=RATES))
    compiled = torch.compile(model, backend="dilated", options={"policy": pol, "mode": "max-autotune"})
    x = torch.randn(2, 37, 16, requires_grad=True)
    try:
        out, want = compiled(x), reference(x)
        torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
        (g,) = torch.autograd.grad(out.sum(), x)
        (g_ref,) = torch.autograd.grad(want.sum(), x)
        torch.testing.assert_close(g, g_ref, atol=1e-5, rtol=1e-4)
    finally:
        restore(saved)
    assert counters["dilated"]["rewritten"] == 1


# ---------------------------------------------------------------- the long-context example

EXAMPLE = ROOT / "examples" / "long_context_train.py"
TINY = ["--device", "cpu", "--n-embd", "32", "--n-layer", "2", "--segments", "64,128,256", "--rates", "1,2,4"]


def test_long_context_example_runs_on_cpu():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    res = subprocess.run(
        [sys.executable, str(EXAMPLE), "--seq-len", "512", *TINY],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert res.returncode == 0, res.stdout + res.stderr[-4000:]
    assert "N=     512" in res.stdout and "grads finite: True" in res.stdout
    assert "attention sites rewritten: 2 of 2" in res.stdout


def test_long_context_example_sweep_writes_json_and_png(tmp_path):
    """The sweep at tiny lengths with --dynamic (one compile for all lengths)."""
    import importlib.util
    import json

    spec = importlib.util.spec_from_file_location("long_context_train", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    assert example.main(["--sweep", "--lengths", "200,300,400", "--dynamic", "--out", str(tmp_path), *TINY]) == 0
    doc = json.loads((tmp_path / "peak_memory.json").read_text())
    assert [r["seq_len"] for r in doc["results"]] == [200, 300, 400]
    assert all(r["grads_finite"] and r["peak_bytes"] > 0 for r in doc["results"])
    assert set(doc["fit"]) == {"bytes_per_token", "intercept_bytes", "max_relative_residual"}
    assert (tmp_path / "peak_memory.png").stat().st_size > 1000
    assert counters["stats"]["unique_graphs"] == 1
    fit = example.fit_line([1, 2, 3], [12, 22, 32])
    assert fit["bytes_per_token"] == pytest.approx(10) and fit["intercept_bytes"] == pytest.approx(2)


class _ReentrantCheckpointedBlocks(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = TinyModel(heads=(4, 3))

    def forward(self, x):
        for layer in self.inner.layers:
            x = torch.utils.checkpoint.checkpoint(layer, x, use_reentrant=True)
        return x


def test_reentrant_checkpointing_rewrites_sites_and_matches_reference():
    """use_reentrant=True (HF's old default): the sites are rewritten too (no graph
    break), and the input and parameter gradients equal the float64 reference's."""
    torch.manual_seed(0)
    model = _ReentrantCheckpointedBlocks()
    reference, saved = _reference_model(model, "longnet")
    pol = policy(dilated_rule(match="**.attn", seg=SEG, rates=RATES, head_split="longnet"))
    compiled = torch.compile(model, backend="dilated", options={"policy": pol})
    x = torch.randn(2, 40, 16, requires_grad=True)
    try:
        loss_c, loss_r = compiled(x).pow(2).mean(), reference(x).pow(2).mean()
        loss_c.backward()
        loss_r.backward()
    finally:
        restore(saved)
    torch.testing.assert_close(loss_c, loss_r, atol=1e-5, rtol=1e-5)
    for (name, a), b in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-4, msg=name)
    assert counters["dilated"]["rewritten"] == 2 and counters["dilated"]["left"] == 0
    assert not counters["graph_break"]
