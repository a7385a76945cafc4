"""The models of the FSDP2 x ring training tests (`tests/fsdp_ring_worker.py`) and their
single-process float64 reference training.

`MODELS` holds a factory per model, seeded so that every rank builds the same
weights; `train_reference` trains a copy of a model on the whole global batch
in one process with float64 reference attention of the same kind.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from dilated_compile import dense_reference, dilated_reference, register_layer_mask_attention

SEQ_LEN, BATCH_PER_DP, VOCAB = 64, 2, 64
LR = 1e-2
# dilated inner attention: one pattern whose segments span cp ranks (zigzag chunks of 8 or 16)
DILATED = {"segment_lengths": [32], "dilation_rates": [2], "head_split": "groups"}
# the sliding window of the windowed model's window layers: smaller than a rank's shard (16 or
# 32 tokens), wider than nothing, crossing the zigzag chunks' edges (8 or 16 tokens)
WINDOW = 5


def llama():
    """A tiny HF Llama (2 layers, width 64, 4 heads, 2 key/value heads), SDPA attention."""
    import transformers

    cfg = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                                   max_position_embeddings=256, attn_implementation="sdpa")
    torch.manual_seed(0)
    return cfg, transformers.LlamaForCausalLM(cfg)


def qwen2_window():
    """A tiny HF Qwen2 whose layers mix a sliding window (layer 0, W=WINDOW, as Mistral's
    layers) and full causal attention (layer 1): 2 layers, width 64, 4 heads, 2 key/value
    heads. Its attention builds each layer's mask inside the layer
    (`dilated_compile.register_layer_mask_attention`): FSDP2 compiles each layer as a frame of
    its own, where a mask built by the model outside would be an input, not provably a window."""
    import transformers

    cfg = transformers.Qwen2Config(num_hidden_layers=2, hidden_size=64, intermediate_size=128,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                                   max_position_embeddings=256, use_sliding_window=True, sliding_window=WINDOW,
                                   max_window_layers=0, layer_types=["sliding_attention", "full_attention"],
                                   attn_implementation=register_layer_mask_attention())
    torch.manual_seed(0)
    return cfg, transformers.Qwen2ForCausalLM(cfg)


def mistral_window():
    """A tiny HF Mistral: every layer in a sliding window of WINDOW tokens (2 layers, width 64,
    4 heads, 2 key/value heads), each layer's mask built inside the layer as `qwen2_window`'s."""
    import transformers

    cfg = transformers.MistralConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128,
                                     num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                                     max_position_embeddings=256, sliding_window=WINDOW,
                                     attn_implementation=register_layer_mask_attention())
    torch.manual_seed(0)
    return cfg, transformers.MistralForCausalLM(cfg)


def layer_kinds(cfg) -> list[str]:
    """Each layer's attention, as HF's ``layer_types`` names it: a config's own list, else every
    layer in the config's sliding window if it has one (Mistral), else full causal attention."""
    kinds = getattr(cfg, "layer_types", None)
    if kinds:
        return list(kinds)
    kind = "sliding_attention" if getattr(cfg, "sliding_window", None) else "full_attention"
    return [kind] * cfg.num_hidden_layers


# name -> factory returning (config, model); the reference reads each layer's window from the
# `sliding_window` the model passes to its attention function
MODELS: dict[str, Callable] = {"llama": llama, "qwen2-window": qwen2_window, "mistral-window": mistral_window}


def _reference_attention(inner: str):
    """An HF attention function computing `inner` (causal, global positions, the layer's
    sliding window if it has one) in float64."""

    def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, sliding_window=None,
                  **kwargs):
        groups = query.shape[1] // key.shape[1]
        key, value = (t.repeat_interleave(groups, dim=1) for t in (key, value))
        q, k, v = (t.double() for t in (query, key, value))
        if inner == "dense":
            out = dense_reference(q, k, v, is_causal=True, window=sliding_window, scale=scaling)
        elif sliding_window is not None:
            raise ValueError("dilated attention does not keep a sliding window")
        else:
            out = dilated_reference(q, k, v, DILATED["segment_lengths"], DILATED["dilation_rates"],
                                    head_split=DILATED["head_split"], is_causal=True, scale=scaling)
        return out.to(query.dtype).transpose(1, 2).contiguous(), None

    return attention


def train_reference(model, inner: str, ids: torch.Tensor, labels: torch.Tensor, steps: int) -> list[dict]:
    """Single-process training of `model` on the global batch: loss, gradients and parameters of each step."""
    import transformers

    name = f"float64_reference_{inner}"
    transformers.AttentionInterface.register(name, _reference_attention(inner))
    model.set_attn_implementation(name)
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    record = []
    for _ in range(steps):
        logits = model(input_ids=ids, use_cache=False).logits
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        loss.backward()
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
        opt.step()
        opt.zero_grad()
        record.append({"loss": loss.item(), "grads": grads,
                       "params": {n: p.detach().clone() for n, p in model.named_parameters()}})
    return record
