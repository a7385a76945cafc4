"""nn.MultiheadAttention wherever real models put it (docs/spec.md, "Attention sites"): alone
with a causal, boolean or no mask, inside nn.Transformer's encoder and decoder layers (cross-
attention left), and the encoder layer's inference fast path written out as its ops; each
rewritten site equals the same module computing its attention with `dilated_attention`.
"""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._dynamo.utils import counters

from dilated_compile import explain

from .forms_common import MHA, N, POLICY, dilated, fresh_dynamo, rewritten_eager  # noqa: F401 (autouse fixture)


def dilated_mha(mha: nn.MultiheadAttention, is_causal: bool):
    """A forward for `mha` that computes its self-attention with dilated_attention (the ground truth)."""

    def forward(query, key, value, **kwargs):
        x = query if mha.batch_first else query.transpose(0, 1)
        b, n, e = x.shape
        h = mha.num_heads
        q, k, v = F.linear(x, mha.in_proj_weight, mha.in_proj_bias).view(b, n, 3, h, e // h).permute(2, 0, 3, 1, 4)
        y = mha.out_proj(dilated(q, k, v, is_causal=is_causal).permute(0, 2, 1, 3).reshape(b, n, e))
        return (y if mha.batch_first else y.transpose(0, 1)), None

    return forward


def _compare_module(model, reference, x, compiled):
    out = compiled(x)
    expected = reference(x)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)
    out.pow(2).sum().backward()
    expected.pow(2).sum().backward()
    for (name, a), b in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("mask,causal", [("hint", True), ("bool", True), ("none", False)])
@pytest.mark.parametrize("batch_first", [True, False])
def test_multihead_attention(batch_first, mask, causal):
    torch.manual_seed(0)
    model = MHA(batch_first, mask)
    x = torch.randn(2, N, 16)
    report = explain(model, x, policy=POLICY)
    (site,) = report.sites
    assert (site.module, site.status, site.is_causal) == ("attn", "rewritten", causal), str(report)
    assert site.form.startswith("mha")
    reference = copy.deepcopy(model)
    reference.attn.forward = dilated_mha(reference.attn, causal)
    _compare_module(model, reference, x, rewritten_eager(model))


def test_transformer_encoder_and_decoder_layers_through_the_backend():
    """Encoder self-attention (non-causal), decoder self-attention (causal), cross-attention left.

    tgt_is_causal=True: without it nn.Transformer compares the mask with a causal one
    (`_detect_is_causal_mask`), a graph break inside torch.nn after which Dynamo compiles
    nothing of the model (the same under backend="inductor")."""
    torch.manual_seed(0)
    model = nn.Transformer(16, 2, num_encoder_layers=1, num_decoder_layers=1, dim_feedforward=32,
                           dropout=0.0, batch_first=True)
    src, tgt = torch.randn(2, N, 16), torch.randn(2, N, 16)
    causal = nn.Transformer.generate_square_subsequent_mask(N)
    report = explain(model, src, tgt, tgt_mask=causal, tgt_is_causal=True, policy=POLICY)
    sites = {s.module: s for s in report.sites}
    assert set(sites) == {"encoder.layers.0.self_attn", "decoder.layers.0.self_attn",
                          "decoder.layers.0.multihead_attn"}
    assert sites["encoder.layers.0.self_attn"].is_causal is False
    assert sites["decoder.layers.0.self_attn"].is_causal is True
    cross = sites["decoder.layers.0.multihead_attn"]
    assert cross.status == "left" and "cross-attention" in cross.reason

    reference = copy.deepcopy(model)
    reference.encoder.layers[0].self_attn.forward = dilated_mha(reference.encoder.layers[0].self_attn, False)
    reference.decoder.layers[0].self_attn.forward = dilated_mha(reference.decoder.layers[0].self_attn, True)
    compiled = torch.compile(model, backend="dilated", options={"policy": POLICY})
    out = compiled(src, tgt, tgt_mask=causal, tgt_is_causal=True)
    expected = reference(src, tgt, tgt_mask=causal, tgt_is_causal=True)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)
    out.pow(2).sum().backward()
    expected.pow(2).sum().backward()
    for (name, a), b in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-4, msg=name)
    assert counters["dilated"]["rewritten"] == 2 and counters["dilated"]["left"] == 1


class CausalEncoder(nn.Module):
    """nn.TransformerEncoder with its causal mask built inside (constant at fixed shapes)."""

    def __init__(self, norm_first, activation, causal):
        super().__init__()
        layer = nn.TransformerEncoderLayer(16, 4, 32, batch_first=True, norm_first=norm_first,
                                           activation=activation)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.causal = causal

    def forward(self, x):
        mask = nn.Transformer.generate_square_subsequent_mask(x.shape[1]) if self.causal else None
        return self.encoder(x, mask=mask, is_causal=self.causal)


@pytest.mark.parametrize("norm_first,activation,causal", [(False, "relu", True), (True, "gelu", False)])
def test_encoder_layer_inference_fast_path_is_written_out_and_rewritten(norm_first, activation, causal):
    """Eval mode under no_grad: each layer is one fused op; the rewrite writes it out as its
    ops with the attention in the middle, reported under the layer's self_attn."""
    torch.manual_seed(0)
    model = CausalEncoder(norm_first, activation, causal).eval()
    x = torch.randn(2, N, 16)
    with torch.no_grad():
        report = explain(model, x, policy=POLICY)
        assert [(s.module, s.form, s.status, s.is_causal) for s in report.sites] == [
            (f"encoder.layers.{i}.self_attn", "encoder-layer-fastpath", "rewritten", causal) for i in range(2)
        ], str(report)
        torch._dynamo.reset()
        out = rewritten_eager(model)(x)
    reference = copy.deepcopy(model)
    for layer in reference.encoder.layers:
        layer.self_attn.forward = dilated_mha(layer.self_attn, causal)
    torch.testing.assert_close(out, reference(x), atol=1e-5, rtol=1e-4)


def test_encoder_layer_fast_path_with_padding_mask_is_left():
    layer = nn.TransformerEncoderLayer(16, 4, 32, batch_first=True).eval()
    x, pad = torch.randn(2, N, 16), torch.zeros(2, N, dtype=torch.bool)
    pad[0, -2:] = True
    with torch.no_grad():
        report = explain(layer, x, src_key_padding_mask=pad, policy=POLICY)
        (site,) = report.sites
        assert site.status == "left" and "key padding mask" in site.reason
        assert "set_fastpath_enabled(False)" in site.reason
        torch._dynamo.reset()
        assert torch.equal(rewritten_eager(layer)(x, src_key_padding_mask=pad), layer(x, src_key_padding_mask=pad))
