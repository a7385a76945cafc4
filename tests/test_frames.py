"""Site paths are paths in the model the user called, whatever frames Dynamo compiles
(whole model, per block, FSDP2 per layer), and what a policy targeted but did not get
is warned about once per model (an error under strict)."""

import copy
import socket
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import dilated_compile
from dilated_compile import RewriteError, dilated_reference, explain
from dilated_compile.targets import TargetWarning, check_targets

from .models import TinyModel, dilated_rule, policy

transformers = pytest.importorskip("transformers")

SEG, RATES = (8, 16), (1, 2)
FULL_PATH = {"version": 1, "rules": [{"match": "model.layers.*.self_attn", "attention": "dilated",
                                      "segment_lengths": list(SEG), "dilation_rates": list(RATES)}]}
LAYERS = ["model.layers.0.self_attn", "model.layers.1.self_attn"]


# transformers keeps an explicit causal mask while compiling on torch before 2.13, so an HF
# model's mask reaches a frame's graph as an input and its sites are left with that reason
# (with a warning): see docs/limitations.md.
hf_mask_is_constant = pytest.mark.skipif(
    tuple(int(x) for x in torch.__version__.split(".")[:2]) < (2, 13),
    reason="transformers passes its causal mask as a graph input on torch < 2.13 (sites left, warned)",
)


def _reference_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                         is_causal=None, **kwargs):
    """HF attention interface: float64 dilated reference, back in the input dtype."""
    if attention_mask is not None:
        raise AssertionError("these tests feed no padding mask")
    groups = query.shape[1] // key.shape[1]
    key, value = (t.repeat_interleave(groups, dim=1) for t in (key, value))
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    out = dilated_reference(query.double(), key.double(), value.double(), SEG, RATES,
                            is_causal=causal, scale=scaling)
    return out.to(query.dtype).transpose(1, 2).contiguous(), None


def _llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   hidden_size=64, intermediate_size=128, vocab_size=128,
                                   max_position_embeddings=128)
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.set_attn_implementation("sdpa")
    reference = copy.deepcopy(model)
    transformers.AttentionInterface.register("dilated_reference_frames", _reference_attention)
    reference.set_attn_implementation("dilated_reference_frames")
    return model, reference


def _compiled_paths() -> dict[str, str]:
    """module path -> status, of the sites in the graphs compiled since clear_reports(),
    with the same-class modules that run a graph's compiled code."""
    paths = {}
    for r in dilated_compile.reports():
        for s in r.sites:
            paths[s.module] = s.status
        status = {s.status for s in r.sites}
        for p in r.also_runs_for:
            paths[p] = status.pop() if len(status) == 1 else "?"
    return paths


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@hf_mask_is_constant
def test_fsdp2_per_layer_paths_are_absolute():
    """FSDP2 on each decoder layer (one gloo process): each layer is a frame of its own;
    the full-path rule rewrites every layer, and the model equals the reference."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    torch._dynamo.reset()
    dilated_compile.clear_reports()
    dist.init_process_group("gloo", rank=0, world_size=1, init_method=f"tcp://127.0.0.1:{_free_port()}")
    try:
        model, reference = _llama()
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        ids = torch.randint(0, 128, (2, 24))
        with warnings.catch_warnings():
            warnings.simplefilter("error", TargetWarning)
            with torch.no_grad():
                out = torch.compile(model, backend="dilated", options={"policy": FULL_PATH})(ids).logits
        assert {p: s for p, s in _compiled_paths().items() if "self_attn" in p} == dict.fromkeys(LAYERS, "rewritten")
        with torch.no_grad():
            expected = reference(ids).logits
        torch.testing.assert_close(out, expected, atol=2e-5, rtol=1e-4)
    finally:
        dist.destroy_process_group()
        torch._dynamo.reset()


def test_per_block_compile_paths_are_absolute():
    torch._dynamo.reset()
    dilated_compile.clear_reports()
    model, reference = _llama()
    for layer in model.model.layers:
        layer.compile(backend="dilated", options={"policy": FULL_PATH})
    ids = torch.randint(0, 128, (2, 24))
    with warnings.catch_warnings():
        warnings.simplefilter("error", TargetWarning)
        with torch.no_grad():
            out = model(ids).logits
            model(ids)  # the next call runs the once-per-model check: nothing to warn
    assert _compiled_paths() == dict.fromkeys(LAYERS, "rewritten")
    with torch.no_grad():
        torch.testing.assert_close(out, reference(ids).logits, atol=2e-5, rtol=1e-4)
    torch._dynamo.reset()


def _target_warnings(record) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, TargetWarning)]


def test_rule_without_site_warns_once_per_model():
    """Two layers compiled per block (two graphs): the rule that matches nothing is told
    once, at the model's next call, not once per graph; strict raises there."""
    torch._dynamo.reset()
    model = TinyModel(heads=(5, 3))  # different shapes: one graph per layer
    pol = policy(dilated_rule(), dilated_rule(match="encoder.**"))
    for layer in model.layers:
        layer.compile(backend="dilated", options={"policy": pol})
    x = torch.randn(1, 20, 16)
    with pytest.warns(TargetWarning) as record:
        model(x)
        model(x)
        model(x)
    told = _target_warnings(record)
    assert len(told) == 1 and "rules[1] 'encoder.**' matches no attention site" in told[0], told

    torch._dynamo.reset()
    model = TinyModel(heads=(5, 3))
    for layer in model.layers:
        layer.compile(backend="dilated", options={"policy": policy(dilated_rule(), dilated_rule(match="encoder.**"),
                                                                   strict=True)})
    model(x)
    with pytest.raises(RewriteError, match="encoder"):
        model(x)
    torch._dynamo.reset()


def test_explain_warns_rule_without_site_on_return():
    torch._dynamo.reset()
    with pytest.warns(TargetWarning, match="'encoder.\\*\\*' matches no attention site"):
        report = explain(TinyModel(), torch.randn(1, 20, 16), policy=policy(dilated_rule(), dilated_rule(match="encoder.**")))
    assert report.warnings == ["rules[1] 'encoder.**' matches no attention site"]
    with pytest.raises(RewriteError, match="encoder"):
        explain(TinyModel(), torch.randn(1, 20, 16),
                policy=policy(dilated_rule(), dilated_rule(match="encoder.**"), strict=True))


class SplitAttention(nn.Module):
    """Hand-written attention with a graph break between scores and softmax: no graph
    holds the whole attention."""

    def __init__(self, dim=16, heads=2):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-2, -1) / (d // self.heads) ** 0.5
        torch._dynamo.graph_break()
        return (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, n, d)


class TwoKinds(nn.Module):
    """`layers.0.attn` whole, `layers.1.attn` split by a graph break (or disabled)."""

    def __init__(self, second: nn.Module):
        super().__init__()
        self.layers = nn.ModuleList([nn.Module(), nn.Module()])
        self.layers[0].attn = SplitAttention()
        self.layers[0].attn.forward = self._whole(self.layers[0].attn)
        self.layers[1].attn = second

    @staticmethod
    def _whole(module):
        def forward(x):
            b, n, d = x.shape
            q, k, v = module.qkv(x).view(b, n, 3, module.heads, d // module.heads).permute(2, 0, 3, 1, 4)
            return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        return forward

    def forward(self, x):
        return self.layers[1].attn(self.layers[0].attn(x))


@pytest.mark.parametrize("how,reason", [("graph_break", "graph_break"), ("disable", "disable")])
def test_targeted_module_outside_compiled_code_is_warned(how, reason):
    torch._dynamo.reset()
    second = SplitAttention()
    if how == "disable":
        second.forward = torch.compiler.disable(TwoKinds._whole(second))
    model = TwoKinds(second)
    x = torch.randn(1, 12, 16)
    compiled = torch.compile(model, backend="dilated", options={"policy": policy(dilated_rule(match="layers.*.attn"))})
    with pytest.warns(TargetWarning) as record:
        out = compiled(x)
        compiled(x)
    told = _target_warnings(record)
    assert len(told) == 1 and "targets layers.1.attn" in told[0] and reason in told[0], told
    assert not any("layers.0" in t for t in told)
    # layer 0 became dilated attention; layer 1 ran outside compiled code, as it is (dense)
    a = model.layers[0].attn
    q, k, v = a.qkv(x).view(1, 12, 3, a.heads, 8).permute(2, 0, 3, 1, 4).double()
    h = dilated_reference(q, k, v, (8, 16), (1, 2)).transpose(1, 2).reshape(1, 12, 16).float()
    torch.testing.assert_close(out, model.layers[1].attn(h), atol=2e-5, rtol=1e-4)
    torch._dynamo.reset()


def test_same_class_frames_with_different_rules_raise():
    """Two layers of one class and shapes compiled per block share one compiled frame:
    a policy that rewrites only layer 0 cannot be honoured, and says so."""
    torch._dynamo.reset()
    model = TinyModel(heads=(4, 4))
    for layer in model.layers:
        layer.compile(backend="dilated", options={"policy": policy(dilated_rule(match="layers.0.attn"))})
    with pytest.raises(Exception, match="layers.1.attn") as info:
        model(torch.randn(1, 20, 16))
    assert "Write rules that give every Block the same decision" in str(info.value)
    torch._dynamo.reset()


def test_same_class_frames_share_the_decision():
    """With one rule for both layers, the second layer runs the first's compiled graph,
    and both compute dilated attention (float64 reference per layer)."""
    torch._dynamo.reset()
    dilated_compile.clear_reports()
    torch.manual_seed(0)
    model = TinyModel(heads=(4, 4))
    for layer in model.layers:
        layer.compile(backend="dilated", options={"policy": policy(dilated_rule())})
    x = torch.randn(1, 20, 16)
    with torch.no_grad():
        out = model(x)
    assert _compiled_paths() == {"layers.0.attn": "rewritten", "layers.1.attn": "rewritten"}
    expected = x.double()
    for layer in model.layers:
        a = layer.attn
        h = layer.ln.double()(expected)
        q, k, v = a.qkv.double()(h).view(1, 20, 3, a.heads, a.head_dim).permute(2, 0, 3, 1, 4)
        o = dilated_reference(q, k, v, (8, 16), (1, 2), is_causal=a.is_causal)
        expected = expected + a.proj.double()(o.transpose(1, 2).reshape(1, 20, -1))
    torch.testing.assert_close(out.double(), expected, atol=2e-5, rtol=1e-4)
    torch._dynamo.reset()


class BreakingBlock(nn.Module):
    """A block with a graph break before its attention."""

    def __init__(self, dim=16, heads=2):
        super().__init__()
        self.attn = SplitAttention(dim, heads)
        self.attn.forward = TwoKinds._whole(self.attn)

    def forward(self, x):
        x = x * 2
        torch._dynamo.graph_break()
        return x + self.attn(x)


class Blocks(nn.Module):
    def __init__(self, *blocks):
        super().__init__()
        self.layers = nn.ModuleList(blocks)

    def forward(self, x):
        return self.layers[2](self.layers[1](self.layers[0](x)))


def test_graph_break_resume_frames_have_absolute_paths():
    """A graph break in layers.1: layers.1's attention is compiled in a resume function of
    its own frame, layers.2's in a resume function of the model's, where the module is a
    value on the stack (`L['___stack0']`), not `self`: every site still has its full path."""
    torch._dynamo.reset()
    plain = BreakingBlock()
    plain.forward = lambda x: x + plain.attn(x)
    model = Blocks(plain, BreakingBlock(), plain.__class__())
    model.layers[2].forward = lambda x, b=model.layers[2]: x + b.attn(x)
    report = explain(model, torch.randn(1, 12, 16), policy=policy(dilated_rule(match="layers.*.attn")))
    assert sorted(s.module for s in report.sites) == ["layers.0.attn", "layers.1.attn", "layers.2.attn"]
    assert all(s.status == "rewritten" for s in report.sites)


def test_module_outside_the_model_is_warned():
    """A compiled model that calls a module which is not one of its submodules: the site's
    path cannot be a name in the model, and the user is told."""
    torch._dynamo.reset()
    outside = SplitAttention()
    outside.forward = TwoKinds._whole(outside)

    class Caller(nn.Module):
        def forward(self, x):
            return outside(x)

    with pytest.warns(UserWarning, match="cannot tell where the module"):
        explain(Caller(), torch.randn(1, 12, 16), policy=policy(dilated_rule(match="**")))


class _AttentionInOwnForward(nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


class _OuterNotCompiled(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([_AttentionInOwnForward()])

    @torch._dynamo.disable(recursive=False)
    def forward(self, q, k, v):
        return self.blocks[0](q, k, v)


def test_attention_in_a_frames_own_forward_has_the_modules_path():
    """A module compiled as a frame of its own, with attention written in its own forward
    (no module call around it): the site's path is that module's path in the model,
    not the root's."""
    pol = {"version": 1, "rules": [{"match": "blocks.0", "attention": "dilated",
                                    "segment_lengths": [4], "dilation_rates": [1]}]}
    q, k, v = (torch.randn(1, 2, 8, 4) for _ in range(3))
    report = explain(_OuterNotCompiled(), q, k, v, policy=pol)
    assert [(s.module, s.status) for s in report.sites] == [("blocks.0", "rewritten")]
