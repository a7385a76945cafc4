"""Training with sequence lengths that change from step to step: the custom ops that sites
with a symbolic length call (dilated and block-sparse, forward and backward against float64,
dense below min_seq_len, opcheck), and compiled models trained over several lengths like the
float64 reference, without recompiles."""

import copy

import pytest
import torch
from torch._dynamo.utils import counters

import dilated_compile
from dilated_compile import block_sparse_reference, dense_reference, dilated_reference
from dilated_compile.lowering.dilated.arguments import encode_parameters
from dilated_compile.lowering.dilated.op import dynamic_dilated_attention
from dilated_compile.lowering.block_sparse.op import dynamic_block_sparse_attention

from .models import TinyModel, dilated_rule, policy, restore, with_attention_replaced
from .tolerance import assert_within
from .training_common import RATES, SEG, _reference_model, fresh_dynamo  # noqa: F401 (autouse fixture)

LENGTHS = (20, 32, 37, 64, 97)  # multiples and non-multiples of the segments, and N < w


# ---------------------------------------------------------------- dynamic lengths


@pytest.mark.parametrize("head_split", ["groups", "longnet"])
@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("n", [1, 5, 37, 64])
def test_dynamic_op_equals_reference(n, is_causal, head_split):
    """The custom op that symbolic-length sites call, forward and backward, vs float64."""
    torch.manual_seed(n)
    q, k, v = (torch.randn(2, 5, n, 8, requires_grad=True) for _ in range(3))
    out = dynamic_dilated_attention(q, k, v, SEG, RATES, head_split=head_split, is_causal=is_causal)
    _assert_matches_reference(
        out, (q, k, v), lambda *x: dilated_reference(*x, SEG, RATES, head_split=head_split, is_causal=is_causal),
        is_causal,
    )


def test_dynamic_op_is_dense_below_min_seq_len():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 3, 30, 8, dtype=torch.float64) for _ in range(3))
    out = dynamic_dilated_attention(q, k, v, SEG, RATES, is_causal=True, min_seq_len=31)
    dense = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(out, dense)
    sparse = dynamic_dilated_attention(q, k, v, SEG, RATES, is_causal=True, min_seq_len=30)
    torch.testing.assert_close(sparse, dilated_reference(q, k, v, SEG, RATES, is_causal=True))


def test_dynamic_op_passes_opcheck():
    q, k, v = (torch.randn(2, 3, 19, 8, requires_grad=True) for _ in range(3))
    torch.library.opcheck(
        torch.ops.dilated_compile.dilated_attention.default,
        (q, k, v, encode_parameters(SEG, RATES, "longnet"), True, 0.3, 0),
    )


def _assert_matches_reference(out, qkv, reference, is_causal) -> None:
    """`out` and the gradients of q, k, v equal `reference(q, k, v)` in float64."""
    q, k, v = qkv
    qd, kd, vd = (x.detach().double().requires_grad_() for x in qkv)
    ref = reference(qd, kd, vd)
    assert_within(out, ref, q, k, v, is_causal=is_causal)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, qkv, grad)
    want = torch.autograd.grad(ref, (qd, kd, vd), grad.double())
    for name, g, w in zip("qkv", got, want):
        torch.testing.assert_close(g.double(), w, atol=1e-5, rtol=1e-4, msg=f"d{name}")


def _train_over_lengths(model, reference, saved, pol, dynamic, lengths) -> list[int]:
    """One SGD step per length of `model` compiled with `pol` (fullgraph) and of `reference`:
    loss and gradients equal at every step, no recompile from the third length on.
    Returns Dynamo's unique graph count after each step; restores `saved` at the end."""
    compiled = torch.compile(model, backend="dilated", options={"policy": pol}, fullgraph=True, dynamic=dynamic)
    opt_c = torch.optim.SGD(model.parameters(), lr=0.05)
    opt_r = torch.optim.SGD(reference.parameters(), lr=0.05)
    graphs_after = []
    try:
        for step, n in enumerate(lengths):
            x, target = torch.randn(2, n, 16), torch.randn(2, n, 16)
            with torch._dynamo.config.patch(error_on_recompile=step >= 2):
                loss_c = (compiled(x) - target).pow(2).mean()
            loss_r = (reference(x) - target).pow(2).mean()
            loss_c.backward()
            loss_r.backward()
            torch.testing.assert_close(loss_c, loss_r, atol=1e-5, rtol=1e-5, msg=f"loss at N={n}")
            for (name, a), b in zip(model.named_parameters(), reference.parameters()):
                torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-4, msg=f"{name} at N={n}")
            for opt in (opt_c, opt_r):
                opt.step()
                opt.zero_grad()
            graphs_after.append(counters["stats"]["unique_graphs"])
    finally:
        restore(saved)
    return graphs_after


@pytest.mark.parametrize(
    "dynamic, head_split", [pytest.param(True, "longnet", marks=pytest.mark.inductor), (None, "groups")],
    ids=["dynamic_true", "automatic_dynamic"]
)
def test_lengths_train_like_reference_without_recompiles(dynamic, head_split):
    """fullgraph=True, one optimizer step per length: the compiled model's loss and
    gradients equal the same model with float64 reference attention, step by step.

    dynamic=True: one graph for every length. Automatic dynamic: the first length
    compiles a static graph, the second marks the length dynamic and compiles the
    custom-op graph, and no later length recompiles (error_on_recompile).
    """
    torch.manual_seed(0)
    model = TinyModel(heads=(5, 3))
    reference, saved = _reference_model(model, head_split)
    pol = policy(dilated_rule(seg=SEG, rates=RATES, head_split=head_split))
    graphs_after = _train_over_lengths(model, reference, saved, pol, dynamic, LENGTHS)
    assert not counters["graph_break"]
    if dynamic:
        assert graphs_after == [1] * len(LENGTHS)
    else:
        assert graphs_after == [1, 2, 2, 2, 2]
    reports = dilated_compile.reports()
    assert all(s.status == "rewritten" for s in reports[-1].sites)
    assert "dynamic length" in reports[-1].sites[0].attention


def test_dynamic_min_seq_len_is_decided_per_call():
    """A symbolic-length site cannot compare N with min_seq_len when compiled: the op
    runs dense attention below it and dilated attention from it, with one graph."""
    torch.manual_seed(0)
    model = TinyModel(heads=(4,))
    reference, saved = _reference_model(model, "groups", min_seq_len=40)
    pol = policy(dilated_rule(seg=SEG, rates=RATES), min_seq_len=40)
    compiled = torch.compile(model, backend="dilated", options={"policy": pol}, dynamic=True)
    try:
        for n in (24, 39, 40, 61):
            x = torch.randn(1, n, 16)
            torch.testing.assert_close(compiled(x), reference(x), atol=1e-5, rtol=1e-5, msg=f"N={n}")
    finally:
        restore(saved)
    assert counters["stats"]["unique_graphs"] == 1


# ---------------------------------------------------------------- block-sparse, dynamic lengths

BLOCK = 8
BS_PATTERNS = {
    "local_window": {"kind": "local_window", "window": 1},
    "global_local": {"kind": "global_local", "window": 1, "global_blocks": 1},
    "dilated": {"kind": "dilated", "window": 0, "stride": 2},
}
BS_LENGTHS = (20, 32, 37, 64, 97)  # multiples of BLOCK and not, N < BLOCK * (pattern's reach)


def _block_sparse_rule(kind, **extra):
    return {"match": "layers.*.attn", "attention": "block_sparse", "block_size": BLOCK,
            "pattern": BS_PATTERNS[kind] if isinstance(kind, str) else kind, **extra}


MASK_MOD = {"kind": "mask_mod", "function": "tests.masks:stripes"}


@pytest.mark.parametrize("kind", [*BS_PATTERNS, "mask_mod"])
@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("n", [1, 5, 37, 64])
def test_dynamic_block_sparse_op_equals_reference(n, is_causal, kind):
    """The block-sparse custom op, forward and backward (from out and lse), vs float64."""
    torch.manual_seed(n)
    q, k, v = (torch.randn(2, 3, n, 8, requires_grad=True) for _ in range(3))
    pattern = MASK_MOD if kind == "mask_mod" else BS_PATTERNS[kind]
    kw = {"block_size": BLOCK, "pattern": pattern, "is_causal": is_causal}
    out = dynamic_block_sparse_attention(q, k, v, **kw)
    _assert_matches_reference(out, (q, k, v), lambda *x: block_sparse_reference(*x, **kw), is_causal)


def test_dynamic_block_sparse_op_is_dense_below_min_seq_len():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 3, 30, 8, dtype=torch.float64) for _ in range(3))
    kw = {"block_size": BLOCK, "pattern": BS_PATTERNS["local_window"], "is_causal": True}
    out = dynamic_block_sparse_attention(q, k, v, min_seq_len=31, **kw)
    torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True))
    sparse = dynamic_block_sparse_attention(q, k, v, min_seq_len=30, **kw)
    torch.testing.assert_close(sparse, block_sparse_reference(q, k, v, **kw))


@pytest.mark.parametrize(
    "args",
    [({"kind": "global_local", "window": 1, "global_blocks": 1}, True, 0.3, 0),
     ({"kind": "dilated", "window": 0, "stride": 2}, False, 0.3, 0),
     ({"kind": "local_window", "window": 1}, True, 0.3, 20),
     ({"kind": "mask_mod", "function": "tests.masks:stripes"}, True, 0.3, 0)],
    ids=["global_local_causal", "dilated", "dense_below_min_seq_len", "mask_mod"],
)
def test_dynamic_block_sparse_ops_pass_opcheck(args):
    from dilated_compile.lowering.block_sparse.arguments import encode_parameters as encode_block_sparse

    pattern, *rest = args
    args = (encode_block_sparse(BLOCK, pattern), *rest)
    q, k, v = (torch.randn(2, 3, 19, 8, requires_grad=True) for _ in range(3))
    torch.library.opcheck(torch.ops.dilated_compile.block_sparse_attention.default, (q, k, v, *args))
    out, lse = torch.ops.dilated_compile.block_sparse_attention(q, k, v, *args)
    dout = torch.randn_like(out)
    torch.library.opcheck(
        torch.ops.dilated_compile.block_sparse_attention_backward.default,
        (dout, q.detach(), k.detach(), v.detach(), out.detach(), lse, *args),
    )


def _block_sparse_reference_model(model, kind):
    ref = copy.deepcopy(model)

    def attention(q, k, v, module):
        return block_sparse_reference(
            q, k, v, block_size=BLOCK, pattern=BS_PATTERNS[kind], is_causal=module.is_causal
        ).to(q.dtype)

    return ref, with_attention_replaced(ref, attention)


@pytest.mark.parametrize(  # each pattern kind, causality and dynamic mode meets each value of the others
    "dynamic,is_causal,kind",
    [(True, False, "local_window"), (None, True, "local_window"), (None, False, "global_local"),
     pytest.param(True, True, "global_local", marks=pytest.mark.inductor)],
    ids=["dynamic_true-full-local_window", "automatic_dynamic-causal-local_window",
         "automatic_dynamic-full-global_local", "dynamic_true-causal-global_local"],
)
def test_block_sparse_lengths_train_like_reference_without_recompiles(dynamic, is_causal, kind):
    """As test_lengths_train_like_reference_without_recompiles, for block_sparse sites:
    SGD steps at lengths that are and are not multiples of the block size, loss and
    gradients equal the float64 reference step by step, no recompile after the
    length turned dynamic (dynamic=True: one graph for all)."""
    torch.manual_seed(0)
    model = TinyModel(heads=(5, 3), is_causal=is_causal)
    reference, saved = _block_sparse_reference_model(model, kind)
    pol = policy(_block_sparse_rule(kind))
    graphs_after = _train_over_lengths(model, reference, saved, pol, dynamic, BS_LENGTHS)
    assert not counters["graph_break"]
    assert graphs_after == ([1] * len(BS_LENGTHS) if dynamic else [1, 2, 2, 2, 2])
    sites = dilated_compile.reports()[-1].sites
    assert len(sites) == 2 and all(s.status == "rewritten" for s in sites)
    assert all(
        s.attention.startswith(f"block_sparse b={BLOCK} {kind}(")
        and s.attention.endswith("; dynamic length (custom op), dense below min_seq_len 0")
        for s in sites
    ), sites[0].attention


def test_block_sparse_dynamic_min_seq_len_is_decided_per_call():
    """Dense below min_seq_len, block-sparse from it, one graph."""
    torch.manual_seed(0)
    model = TinyModel(heads=(4,))
    ref = copy.deepcopy(model)

    def attention(q, k, v, module):
        if q.shape[2] < 40:
            return dense_reference(q, k, v, is_causal=True).to(q.dtype)
        pattern = BS_PATTERNS["dilated"]
        return block_sparse_reference(q, k, v, block_size=BLOCK, pattern=pattern, is_causal=True).to(q.dtype)

    saved = with_attention_replaced(ref, attention)
    pol = policy(_block_sparse_rule("dilated"), min_seq_len=40)
    compiled = torch.compile(model, backend="dilated", options={"policy": pol}, dynamic=True)
    try:
        with torch.no_grad():
            for n in (24, 39, 40, 61):
                x = torch.randn(1, n, 16)
                torch.testing.assert_close(compiled(x), ref(x), atol=1e-5, rtol=1e-5, msg=f"N={n}")
    finally:
        restore(saved)
    assert counters["stats"]["unique_graphs"] == 1


def test_block_sparse_mask_mod_site_with_dynamic_length_is_rewritten_and_trains_like_reference():
    """A mask_mod pattern's function travels to the custom op as its import path: with a
    symbolic length the site is rewritten (one graph), and every length's output and
    gradients equal the float64 reference's (so automatic dynamic shapes cannot turn the
    site into dense attention from the second length on)."""
    from tests.masks import stripes

    torch.manual_seed(0)
    model = TinyModel(heads=(2,))
    ref = copy.deepcopy(model)

    def attention(q, k, v, module):
        out = block_sparse_reference(q, k, v, block_size=BLOCK, pattern=stripes, is_causal=module.is_causal)
        return out.to(q.dtype)

    saved = with_attention_replaced(ref, attention)
    rule = _block_sparse_rule({"kind": "mask_mod", "function": "tests.masks:stripes"})
    compiled = torch.compile(model, backend="dilated", options={"policy": policy(rule)}, dynamic=True)
    try:
        for n in (24, 37):
            x = torch.randn(1, n, 16, requires_grad=True)
            y, y_ref = compiled(x), ref(x)
            torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5, msg=f"N={n}")
            g, g_ref = torch.autograd.grad(y.pow(2).sum(), x), torch.autograd.grad(y_ref.pow(2).sum(), x)
            torch.testing.assert_close(g, g_ref, atol=1e-4, rtol=1e-4, msg=f"N={n}")
    finally:
        restore(saved)
    assert counters["stats"]["unique_graphs"] == 1
    (site,) = dilated_compile.reports()[-1].sites
    assert site.status == "rewritten", site.reason
    assert "mask_mod(tests.masks:stripes)" in site.attention and "dynamic length (custom op)" in site.attention
