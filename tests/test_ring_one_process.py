"""Ring attention in one process, docs/spec.md "Ring attention": without a process group
ring_attention and the sharding helpers run locally (world size 1), and the ring custom op for
symbolic lengths (lowering/ring/op.py) runs, traces and passes opcheck without one. The
multi-process cases are in `tests/test_ring.py`.
"""

from __future__ import annotations

import pytest
import torch

import dilated_compile
from dilated_compile import dense_reference, dilated_reference, ring_attention, shard, unshard
from dilated_compile.lowering.reference import block_sparse_reference
from dilated_compile.sharding import check_same_on_all_ranks, position_list, ring_info, shard_positions

# ---------------------------------------------------------------------------
# single process: no process group


def _qkv(n, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 3, n, 8, generator=g).to(dtype).requires_grad_() for _ in range(3)]


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("is_causal", [False, True])
def test_no_process_group_runs_locally(layout, is_causal):
    assert ring_info() == (1, 0, None)
    q, k, v = _qkv(13)
    out = ring_attention(q, k, v, layout=layout, is_causal=is_causal)
    ref = dense_reference(q, k, v, is_causal=is_causal)
    torch.testing.assert_close(out, ref)
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
    out = ring_attention(q, k, v, inner="dilated", segment_lengths=[4, 8], dilation_rates=[1, 2],
                         layout=layout, is_causal=is_causal)
    torch.testing.assert_close(out, dilated_reference(q, k, v, [4, 8], [1, 2], is_causal=is_causal))
    pattern = {"kind": "local_window", "window": 1}
    out = ring_attention(q, k, v, inner="block_sparse", block_size=3, pattern=pattern,
                         layout=layout, is_causal=is_causal)
    ref = block_sparse_reference(q, k, v, block_size=3, pattern=pattern, is_causal=is_causal)
    torch.testing.assert_close(out, ref)


def test_dilated_spec_argument():
    """inner="dilated" takes the policy's DilatedSpec as well as loose arguments."""
    from dilated_compile.policy import DilatedSpec

    q, k, v = _qkv(16)
    spec = DilatedSpec((4, 8), (1, 2), "longnet")
    out = ring_attention(q, k, v, inner="dilated", dilated=spec, is_causal=True)
    ref = dilated_reference(q, k, v, [4, 8], [1, 2], head_split="longnet", is_causal=True)
    torch.testing.assert_close(out, ref)
    with pytest.raises(ValueError, match="needs segment_lengths"):
        ring_attention(q, k, v, inner="dilated")
    with pytest.raises(ValueError, match="needs block_size and pattern"):
        ring_attention(q, k, v, inner="block_sparse", block_size=4)
    with pytest.raises(ValueError, match="inner='sparse'"):
        ring_attention(q, k, v, inner="sparse")


def test_no_process_group_helpers():
    x = torch.arange(10)
    assert shard(x, 0, "zigzag") is x and unshard(x, 0, "zigzag") is x
    check_same_on_all_ranks("anything", "policy digest")  # nothing to compare with
    assert shard_positions(12, "zigzag", 1, 3).tolist() == [2, 3, 8, 9]
    assert shard_positions(12, "contiguous", 1, 3).tolist() == [4, 5, 6, 7]
    for layout in ("contiguous", "zigzag"):
        assert position_list(24, layout, 2, 4) == shard_positions(24, layout, 2, 4).tolist()
    with pytest.raises(ValueError, match="layout='diagonal'"):
        shard(x, 0, "diagonal")
    with pytest.raises(ValueError, match="not registered"):
        ring_attention(*_qkv(4), group="missing")


def test_exports():
    for name in ("ring_attention", "shard", "unshard", "register_group"):
        assert name in dilated_compile.__all__ and hasattr(dilated_compile, name)


# ---------------------------------------------------------------------------
# the ring custom op for symbolic lengths (lowering/ring/op.py), without a process group;
# the multi-rank cases are the worker's "dynamic-*" cases


_DYNAMIC_INNERS = {
    "dense": ({}, lambda q, k, v, c: dense_reference(q, k, v, is_causal=c)),
    "dilated": (
        dict(segment_lengths=[4, 8], dilation_rates=[1, 2], head_split="longnet"),
        lambda q, k, v, c: dilated_reference(q, k, v, [4, 8], [1, 2], head_split="longnet", is_causal=c),
    ),
    "block_sparse": (
        dict(block_size=3, pattern={"kind": "global_local", "global_blocks": 1, "window": 1}),
        lambda q, k, v, c: block_sparse_reference(
            q, k, v, block_size=3, pattern={"kind": "global_local", "global_blocks": 1, "window": 1}, is_causal=c
        ),
    ),
}


@pytest.mark.parametrize("inner", list(_DYNAMIC_INNERS))
@pytest.mark.parametrize("is_causal", [False, True])
def test_dynamic_ring_op_world_size_1_matches_reference(inner, is_causal):
    """World size 1: the op runs the ring lowering locally (any layout, odd lengths too)."""
    from dilated_compile.lowering.ring.op import dynamic_ring_attention

    kwargs, reference = _DYNAMIC_INNERS[inner]
    q, k, v = _qkv(13)
    out = dynamic_ring_attention(q, k, v, world_size=1, rank=0, group_name=None, inner=inner,
                                 layout="zigzag", is_causal=is_causal, **kwargs)
    ref = reference(q, k, v, is_causal)
    torch.testing.assert_close(out, ref)
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    ref_grads = torch.autograd.grad(ref.sum(), (q, k, v))
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r)


def test_dynamic_ring_op_with_a_mask_mod_pattern_matches_reference():
    """A block-sparse mask_mod pattern reaches the ring op as its import path; output and
    gradients equal the float64 reference, and the op passes opcheck (run under a
    dispatch mode, where the mask's vmap needs its dispatch keys back)."""
    from dilated_compile.lowering.ring.op import dynamic_ring_attention, ring_op_args

    kwargs = dict(block_size=4, pattern={"kind": "mask_mod", "function": "tests.masks:stripes"})
    q, k, v = _qkv(13)
    out = dynamic_ring_attention(q, k, v, world_size=1, rank=0, group_name=None, inner="block_sparse",
                                 layout="zigzag", is_causal=True, **kwargs)
    ref = block_sparse_reference(q, k, v, is_causal=True, **kwargs)
    torch.testing.assert_close(out, ref)
    for g, r in zip(torch.autograd.grad(out.sum(), (q, k, v)), torch.autograd.grad(ref.sum(), (q, k, v))):
        torch.testing.assert_close(g, r)
    args = [*ring_op_args(1, 0, "", "block_sparse", "contiguous", **kwargs), True, 0.3, 0]
    qs, ks, vs = (torch.randn(2, 3, 19, 8, requires_grad=True) for _ in range(3))
    torch.library.opcheck(torch.ops.dilated_compile.ring_attention.default, (qs, ks, vs, *args))


def test_dynamic_ring_op_below_min_seq_len_is_local_attention():
    """Below min_seq_len (global: shard x world size) the op computes what the static path's
    left site computes: ordinary attention of this rank's shard."""
    from dilated_compile.lowering.ring.op import dynamic_ring_attention

    q, k, v = _qkv(13)
    kwargs = dict(world_size=1, rank=0, group_name=None, inner="dilated", is_causal=True,
                  segment_lengths=[4], dilation_rates=[2])
    out = dynamic_ring_attention(q, k, v, min_seq_len=14, **kwargs)
    torch.testing.assert_close(out, dense_reference(q, k, v, is_causal=True))
    out = dynamic_ring_attention(q, k, v, min_seq_len=13, **kwargs)
    torch.testing.assert_close(out, dilated_reference(q, k, v, [4], [2], is_causal=True))


def _op_args(inner, min_seq_len=0, world_size=1, rank=0, group_name=""):
    from dilated_compile.lowering.ring.op import ring_op_args

    kwargs, _ = _DYNAMIC_INNERS[inner]
    return [*ring_op_args(world_size, rank, group_name, inner, "contiguous", **kwargs), True, 0.3, min_seq_len]


@pytest.mark.parametrize(
    "inner, min_seq_len",
    [("dense", 0), ("dilated", 0), ("block_sparse", 0), ("block_sparse", 20)],
    ids=["dense", "dilated", "block_sparse", "below_min_seq_len"],
)
def test_dynamic_ring_ops_pass_opcheck(inner, min_seq_len):
    q, k, v = (torch.randn(2, 3, 19, 8, requires_grad=True) for _ in range(3))
    args = _op_args(inner, min_seq_len)
    torch.library.opcheck(torch.ops.dilated_compile.ring_attention.default, (q, k, v, *args))
    out, lse = torch.ops.dilated_compile.ring_attention(q, k, v, *args)
    assert out.stride() == (19 * 3 * 8, 8, 3 * 8, 1)  # sequence-major, as the fake promises
    torch.library.opcheck(
        torch.ops.dilated_compile.ring_attention_backward.default,
        (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out.detach(), lse, *args),
    )


def test_dynamic_ring_op_fake_needs_no_process_group():
    """The fake implementation gives shapes and layouts only: a ring over 4 ranks of a group
    that does not exist traces with symbolic sizes, and adds no guard."""
    from torch.fx.experimental.proxy_tensor import make_fx

    args = _op_args("dilated", world_size=4, rank=3, group_name="no-such-group")
    gm = make_fx(lambda q: torch.ops.dilated_compile.ring_attention(q, q, q, *args), tracing_mode="symbolic")(
        torch.randn(2, 3, 10, 8)
    )
    (node,) = [n for n in gm.graph.nodes if n.target is torch.ops.dilated_compile.ring_attention.default]
    out, lse = node.meta["val"]
    assert isinstance(out.shape[2], torch.SymInt) and lse.shape == out.shape[:3]
    assert out.stride()[1:] == (out.shape[3], out.shape[1] * out.shape[3], 1)  # sequence-major
    assert lse.dtype == torch.float32
    shape_env = out.shape[2].node.shape_env
    assert not shape_env.guards


@pytest.mark.inductor
def test_dynamic_ring_rule_world_size_1_compiles_once():
    """A ring rule without a process group and a symbolic length: the inner attention's own
    custom op runs locally, one graph for every length."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    policy = {"version": 1, "rules": [{"match": "**", "attention": "dilated", "segment_lengths": [4, 8],
                                       "dilation_rates": [1, 2], "ring": {"layout": "zigzag"}}]}

    def sdpa(q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)

    compiled = torch.compile(sdpa, backend="dilated", options={"policy": policy}, dynamic=True)
    for n in (11, 16, 21):
        q, k, v = _qkv(n, torch.float32)
        for t in (q, k, v):
            for dim in (0, 1, 3):
                torch._dynamo.mark_static(t, dim)
        ref = dilated_reference(q, k, v, [4, 8], [1, 2], is_causal=True).float()
        torch.testing.assert_close(compiled(q, k, v), ref, atol=1e-5, rtol=1e-5)
    assert counters["stats"]["unique_graphs"] == 1
    site = dilated_compile.reports()[-1].sites[0]
    assert site.status == "rewritten" and "dynamic length (custom op)" in site.attention, site
    assert "world size 1, runs locally" in site.attention
