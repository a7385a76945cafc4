"""Real HF transformers models built from their configs (no weights downloaded),
attn_implementation "sdpa" (SDPA calls) and "eager" (hand-written matmul-softmax
attention with a causal mask built in the graph or sliced from a buffer): every attention layer is found and rewritten, and the
compiled model equals the same model run eagerly with its attention replaced by
dilated_attention (registered through transformers' AttentionInterface)."""

import copy

import pytest
import torch
from torch._dynamo.utils import counters

from dilated_compile import dilated_attention, explain

transformers = pytest.importorskip("transformers")

SEG, RATES, SPLIT = (16, 32), (1, 2), "longnet"
POLICY = {"version": 1, "rules": [{"match": "**", "attention": "dilated", "segment_lengths": list(SEG),
                                   "dilation_rates": list(RATES), "head_split": SPLIT}]}


def _eager_dilated(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                   is_causal=None, **kwargs):
    """The ground truth: HF's attention interface with dilated attention inside."""
    if attention_mask is not None:
        raise AssertionError("this test feeds no padding mask")
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        key, value = (t.repeat_interleave(groups, dim=1) for t in (key, value))
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    out = dilated_attention(query, key, value, SEG, RATES, head_split=SPLIT, is_causal=causal, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def _gpt2():
    cfg = transformers.GPT2Config(n_layer=2, n_head=4, n_embd=64, vocab_size=128, n_positions=256,
                                  bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg), [f"transformer.h.{i}.attn" for i in range(2)]


def _llama():  # grouped-query attention: 4 query heads, 2 key/value heads
    cfg = transformers.LlamaConfig(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   hidden_size=64, intermediate_size=128, vocab_size=128,
                                   max_position_embeddings=256)
    return transformers.LlamaForCausalLM(cfg), [f"model.layers.{i}.self_attn" for i in range(2)]


def _qwen2():  # multi-query: 4 query heads, 1 key/value head
    cfg = transformers.Qwen2Config(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
                                   hidden_size=64, intermediate_size=128, vocab_size=128,
                                   max_position_embeddings=256)
    return transformers.Qwen2ForCausalLM(cfg), [f"model.layers.{i}.self_attn" for i in range(2)]


def _bert():  # an encoder: non-causal attention
    cfg = transformers.BertConfig(num_hidden_layers=2, num_attention_heads=4, hidden_size=64,
                                  intermediate_size=128, vocab_size=128, max_position_embeddings=256)
    return transformers.BertModel(cfg), [f"encoder.layer.{i}.attention.self" for i in range(2)]


def _main_output(out) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


BUILDS = {"gpt2": _gpt2, "llama-gqa": _llama, "qwen2-mqa": _qwen2, "bert": _bert}


@pytest.mark.parametrize("build,implementation", [  # one of them through Inductor, as users run it
    pytest.param(build, impl, id=f"{name}-{impl}",
                 marks=[pytest.mark.inductor] if (name, impl) == ("llama-gqa", "sdpa") else [])
    for name, build in BUILDS.items() for impl in ("sdpa", "eager")
])
def test_hf_model_rewritten_exactly(build, implementation):
    torch.manual_seed(0)
    torch._dynamo.reset()
    counters.clear()
    model, modules = build()
    model.set_attn_implementation(implementation)
    model.eval()
    ids = torch.randint(0, 128, (2, 70))

    report = explain(model, ids, policy=POLICY)
    assert [s.module for s in report.sites] == modules
    assert all(s.status == "rewritten" for s in report.sites)

    reference = copy.deepcopy(model)
    transformers.AttentionInterface.register("dilated_eager_test", _eager_dilated)
    reference.set_attn_implementation("dilated_eager_test")

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend="dilated", options={"policy": POLICY})
    logits = _main_output(compiled(ids))
    graphs = counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())
    expected = _main_output(reference(ids))
    torch.testing.assert_close(logits, expected, atol=2e-5, rtol=1e-4)
    logits.float().pow(2).mean().backward()
    expected.float().pow(2).mean().backward()
    for (name, a), b in zip(model.named_parameters(), reference.parameters()):
        # compiled graphs give zeros where eager gives None (outputs outside the loss)
        ga = a.grad if a.grad is not None else torch.zeros_like(a)
        gb = b.grad if b.grad is not None else torch.zeros_like(b)
        torch.testing.assert_close(ga, gb, atol=5e-5, rtol=1e-3, msg=name)
    assert counters["dilated"]["rewritten"] == len(modules)
    # the rewrite adds no graph and no graph break: the same counts as Dynamo gives the model
    # without it (the counts are Dynamo's, whatever the backend; "eager" skips Inductor's codegen)
    torch._dynamo.reset()
    counters.clear()
    with torch.no_grad():
        torch.compile(model, backend="eager")(ids)
    assert graphs == (counters["stats"]["unique_graphs"], sum(counters["graph_break"].values()))


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_hf_padding_mask_is_left_with_reason(implementation):
    """A padded batch: the mask depends on the input, so every layer is left as it was,
    with the reason, and the model computes what it computes uncompiled."""
    from dilated_compile import load_policy
    from dilated_compile.passes import run_passes

    torch.manual_seed(0)
    torch._dynamo.reset()
    model, modules = _llama()
    model.set_attn_implementation(implementation)
    model.eval()
    ids = torch.randint(0, 128, (2, 40))
    mask = torch.ones(2, 40, dtype=torch.long)
    mask[0, :7] = 0  # left padding
    report = explain(model, ids, attention_mask=mask, policy=POLICY)
    assert [s.module for s in report.sites] == modules
    for s in report.sites:
        assert s.status == "left" and "not a compile-time constant" in s.reason, str(report)
    assert report.diff == ""
    loaded = load_policy(POLICY)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=lambda gm, inputs, **_: run_passes(gm, loaded)[0].forward)
    with torch.no_grad():
        assert torch.equal(compiled(ids, attention_mask=mask).logits, model(ids, attention_mask=mask).logits)
