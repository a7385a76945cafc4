"""`register_layer_mask_attention`: an HF attention function that builds each layer's causal or
sliding-window mask inside the layer. Eager, one process: a tiny HF Qwen2 with a sliding-window
layer and a full-attention layer gives the logits of the same model with transformers' own SDPA
masks and of float64 windowed reference attention; what it cannot do raises. Under FSDP2 x ring:
tests/fsdp_ring_worker.py."""

from __future__ import annotations

import copy

import pytest
import torch

from dilated_compile import dense_reference, register_layer_mask_attention

transformers = pytest.importorskip("transformers")

N, WINDOW = 24, 5


def _model():
    cfg = transformers.Qwen2Config(num_hidden_layers=2, hidden_size=32, intermediate_size=64,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=64,
                                   max_position_embeddings=64, use_sliding_window=True, sliding_window=WINDOW,
                                   max_window_layers=0, layer_types=["sliding_attention", "full_attention"],
                                   attn_implementation="sdpa")
    torch.manual_seed(0)
    return transformers.Qwen2ForCausalLM(cfg).eval()


def _float64_reference(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                       sliding_window=None, **kwargs):
    groups = query.shape[1] // key.shape[1]
    key, value = (t.repeat_interleave(groups, dim=1).double() for t in (key, value))
    out = dense_reference(query.double(), key, value, is_causal=True, window=sliding_window, scale=scaling)
    return out.to(query.dtype).transpose(1, 2).contiguous(), None


def test_layer_masks_give_the_models_own_attention():
    hf = _model()
    mine = copy.deepcopy(hf)
    mine.set_attn_implementation(register_layer_mask_attention())
    reference = copy.deepcopy(hf)
    transformers.AttentionInterface.register("layer_mask_test_reference", _float64_reference)
    reference.set_attn_implementation("layer_mask_test_reference")
    ids = torch.randint(0, 64, (2, N), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got, want, theirs = (m(input_ids=ids, use_cache=False).logits for m in (mine, reference, hf))
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(got, theirs, atol=2e-5, rtol=1e-4)
    # the window matters: without it (every layer causal) the logits differ
    windowless = copy.deepcopy(mine)
    windowless.model.layers[0].self_attn.sliding_window = None
    with torch.no_grad():
        assert (windowless(input_ids=ids, use_cache=False).logits - want).abs().max() > 1e-3


def test_padding_mask_raises():
    model = _model()
    model.set_attn_implementation(register_layer_mask_attention())
    ids = torch.randint(0, 64, (2, N))
    padding = torch.ones(2, N, dtype=torch.long)
    padding[0, :3] = 0
    with pytest.raises(ValueError, match="takes no attention mask"):
        model(input_ids=ids, attention_mask=padding, use_cache=False)
