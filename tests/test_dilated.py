"""Eager dilated attention against the float64 reference (docs/spec.md, "Dilated attention")."""

import itertools

import pytest
import torch
import torch.nn.functional as F

from dilated_compile import dense_reference, dilated_attention, dilated_reference
from dilated_compile.lowering.reference import attention_with_counts, pattern_counts

from .tolerance import assert_within

# (segment_lengths, dilation_rates): powers of two; rates not dividing w (LongNet
# pairs 6 and 12 with power-of-two segments); dilation 16; rate larger than segment.
CONFIGS = {
    "pow2": ((8, 16, 32), (1, 2, 4)),
    "longnet_rates": ((16, 32, 64), (1, 6, 12)),
    "dilation16": ((32, 64), (4, 16)),
    "rate_gt_segment": ((4, 24), (1, 8)),
}
# sequence lengths relative to the segments: multiple of the largest, not a
# multiple, equal to the largest, smaller than the smallest, and 1.
LENGTHS = {"multiple": 128, "ragged": 45, "equal_largest": 64, "short": 3, "one": 1}
HEADS = {"uneven": 5, "fewer_than_patterns": 2, "many": 8}


def _qkv(b, h, n, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, n, d, generator=g).to(dtype) for _ in range(3)]


DTYPES = (torch.float32, torch.bfloat16, torch.float64)


def _matrix():
    """Every head split, causality, pattern set and length; the head counts and dtypes turn
    over along it, so that each value of any two parameters meets the other's every value
    (and each head count meets every head split and pattern set)."""
    cases = itertools.product(["groups", "longnet"], [False, True], CONFIGS, LENGTHS)
    params = []
    for i, (split, causal, config, length) in enumerate(cases):
        heads, dtype = list(HEADS)[i % 3], DTYPES[i // 3 % 3]
        name = f"{split}-{'causal' if causal else 'full'}-{config}-{length}-{heads}-{str(dtype)[6:]}"
        params.append(pytest.param(split, causal, config, length, heads, dtype, id=name))
    return params


@pytest.mark.parametrize("head_split,is_causal,config,length,heads,dtype", _matrix())
def test_matches_reference(head_split, is_causal, config, length, heads, dtype):
    seg, rates = CONFIGS[config]
    q, k, v = _qkv(2, HEADS[heads], LENGTHS[length], 16, dtype)
    out = dilated_attention(q, k, v, seg, rates, head_split=head_split, is_causal=is_causal)
    assert out.shape == q.shape and out.dtype == dtype
    ref = dilated_reference(q, k, v, seg, rates, head_split=head_split, is_causal=is_causal)
    assert_within(out, ref, q, k, v, is_causal=is_causal)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("n", [1, 7, 64])
def test_identity_one_pattern_is_ordinary_attention(n, is_causal, dtype):
    """One pattern with w >= N and r = 1 is exactly dense (or causal) attention."""
    q, k, v = _qkv(2, 3, n, 16, dtype, seed=1)
    for head_split in ("groups", "longnet"):
        out = dilated_attention(q, k, v, [max(n, 64)], [1], head_split=head_split, is_causal=is_causal)
        sdpa = F.scaled_dot_product_attention(q, k, v, is_causal=is_causal)
        assert_within(out, dense_reference(q, k, v, is_causal=is_causal), q, k, v, is_causal=is_causal)
        tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
        torch.testing.assert_close(out, sdpa, atol=tol, rtol=tol)


def test_custom_scale():
    q, k, v = _qkv(1, 4, 40, 8, torch.float64)
    out = dilated_attention(q, k, v, [16, 32], [1, 2], head_split="longnet", scale=0.05)
    ref = dilated_reference(q, k, v, [16, 32], [1, 2], head_split="longnet", scale=0.05)
    torch.testing.assert_close(out, ref)
    default = dilated_attention(q, k, v, [16, 32], [1, 2], head_split="longnet")
    assert (out - default).abs().max() > 1e-3  # the scale is used


# ---- regression tests for the library this project replaces ----------------


def _single_pattern(q, k, v, w, r, offset, is_causal=False):
    """Ordinary softmax attention of each head over one pattern's keys (float64)."""
    n = q.shape[-2]
    return attention_with_counts(q, k, v, pattern_counts(n, w, r, offset, is_causal), None)


def test_uneven_head_ranges():
    """H=5 over 3 groups: sizes 2,2,1, head ranges [0,2) [2,4) [4,5)."""
    seg, rates = (8, 16, 32), (1, 2, 4)
    q, k, v = _qkv(1, 5, 64, 8, torch.float64)
    out = dilated_attention(q, k, v, seg, rates, head_split="groups")
    for heads, i in (((0, 1), 0), ((2, 3), 1), ((4,), 2)):
        expected = _single_pattern(q, k, v, seg[i], rates[i], i % rates[i])
        for h in heads:
            torch.testing.assert_close(out[:, h], expected[:, h])


def test_no_per_group_renormalisation():
    """A selected position's output is its pattern's plain softmax result: not
    divided by the number of groups and not renormalised; unselected ones are 0."""
    q, k, v = _qkv(1, 2, 32, 8, torch.float64, seed=3)
    out = dilated_attention(q, k, v, [8, 16], [1, 2], head_split="groups")
    expected = _single_pattern(q, k, v, 16, 2, 1)  # head 1: group 1, offset 1 % 2
    selected = torch.arange(32) % 2 == 1
    torch.testing.assert_close(out[:, 1, selected], expected[:, 1, selected])
    assert (out[:, 1, ~selected] == 0).all()
    torch.testing.assert_close(out[:, 0], _single_pattern(q, k, v, 8, 1, 0)[:, 0])


@pytest.mark.parametrize("head_split", ["groups", "longnet"])
def test_length_equal_to_largest_segment(head_split):
    seg, rates = (16, 64), (1, 4)
    q, k, v = _qkv(2, 4, 64, 8, torch.float32)
    out = dilated_attention(q, k, v, seg, rates, head_split=head_split, is_causal=True)
    ref = dilated_reference(q, k, v, seg, rates, head_split=head_split, is_causal=True)
    assert_within(out, ref, q, k, v, is_causal=True)


def test_longnet_is_one_softmax_over_union_with_multiplicity():
    """Two identical patterns give every key twice: the same as one pattern."""
    q, k, v = _qkv(1, 3, 24, 8, torch.float64)
    twice = dilated_attention(q, k, v, [8, 8], [2, 2], head_split="longnet")
    once = dilated_attention(q, k, v, [8], [2], head_split="longnet")
    torch.testing.assert_close(twice, once)


# ---- gradients ---------------------------------------------------------------


@pytest.mark.parametrize(
    "head_split,is_causal,n,h,seg,rates",
    [
        ("groups", False, 11, 3, (4, 8), (1, 2)),
        ("groups", True, 13, 5, (4, 6, 16), (1, 2, 3)),
        ("longnet", False, 12, 3, (4, 8), (1, 3)),
        ("longnet", True, 9, 4, (3, 16), (1, 2)),
        ("longnet", True, 1, 2, (4,), (2,)),
    ],
)
def test_gradcheck_float64(head_split, is_causal, n, h, seg, rates):
    q, k, v = (t.requires_grad_() for t in _qkv(1, h, n, 4, torch.float64, seed=n))

    def f(q, k, v):
        return dilated_attention(q, k, v, seg, rates, head_split=head_split, is_causal=is_causal)

    # fast mode: a random projection of the Jacobian, not each entry (~100 times fewer calls)
    assert torch.autograd.gradcheck(f, (q, k, v), fast_mode=True)


@pytest.mark.parametrize("head_split", ["groups", "longnet"])
def test_gradients_match_reference(head_split):
    seg, rates = (8, 16), (1, 4)
    q, k, v = (t.requires_grad_() for t in _qkv(2, 5, 37, 8, torch.float32))
    out = dilated_attention(q, k, v, seg, rates, head_split=head_split, is_causal=True)
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = dilated_reference(qd, kd, vd, seg, rates, head_split=head_split, is_causal=True)
    g = torch.randn_like(ref)
    out.backward(g.float())
    ref.backward(g)
    for a, b in ((q, qd), (k, kd), (v, vd)):
        torch.testing.assert_close(a.grad.double(), b.grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("head_split,backend", [("groups", "aot_eager"), ("longnet", "aot_eager"),
                                                ("groups", "inductor")])
def test_called_inside_torch_compile_gradients_match_reference(head_split, backend):
    """A user's compiled function that calls dilated_attention (Dynamo traces its autograd
    node) trains: output and q/k/v gradients match the float64 reference. torch 2.11 gave
    all-zero gradients here while the node returned the tensor it saved (pytorch#180642)."""
    seg, rates = (16, 32), (1, 2)
    q, k, v = (t.requires_grad_() for t in _qkv(1, 3, 45, 8, torch.float32, seed=3))

    def attend(q, k, v):
        return dilated_attention(q, k, v, seg, rates, head_split=head_split, is_causal=True) * 2

    torch._dynamo.reset()
    out = torch.compile(attend, backend=backend, fullgraph=True)(q, k, v)
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = 2 * dilated_reference(qd, kd, vd, seg, rates, head_split=head_split, is_causal=True)
    g = torch.randn_like(ref)
    out.backward(g.float())
    ref.backward(g)
    torch.testing.assert_close(out.detach().double(), ref.detach(), atol=1e-5, rtol=1e-4)
    for a, b in ((q, qd), (k, kd), (v, vd)):
        torch.testing.assert_close(a.grad.double(), b.grad, atol=1e-5, rtol=1e-4)


# ---- argument errors ---------------------------------------------------------


@pytest.mark.parametrize(
    "seg,rates,head_split,match",
    [
        ((), (), "groups", "non-empty"),
        ((8, 16), (1,), "groups", "same length"),
        ((8, 0), (1, 2), "groups", "positive"),
        ((8,), (-1,), "groups", "positive"),
        ((8,), (1,), "both", "head_split"),
    ],
)
def test_bad_arguments_raise(seg, rates, head_split, match):
    q = torch.randn(1, 2, 8, 4)
    with pytest.raises(ValueError, match=match):
        dilated_attention(q, q, q, seg, rates, head_split=head_split)


def test_bad_shapes_raise():
    q = torch.randn(1, 2, 8, 4)
    with pytest.raises(ValueError, match="batch, heads, seq"):
        dilated_attention(q, q[:, :, :4], q, [4], [1])
    with pytest.raises(ValueError, match="batch, heads, seq"):
        dilated_attention(q[0], q[0], q[0], [4], [1])


def test_fully_unselected_positions_are_zero_and_finite():
    """Rate 8 on a segment of 4: offsets >= 4 select nothing in that pattern."""
    q, k, v = (t.requires_grad_() for t in _qkv(1, 8, 12, 4, torch.float64))
    out = dilated_attention(q, k, v, [4], [8], head_split="longnet")
    assert torch.isfinite(out).all()
    assert (out[:, 4:] == 0).all()
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("head_split", ["groups", "longnet"])
@pytest.mark.parametrize("layout", ["bhnd", "bnhd"])
def test_every_part_its_own_call_on_views(monkeypatch, head_split, is_causal, layout):
    """The large-part path: each part's blocks are strided views of q/k/v, in
    either storage layout, forward and backward."""
    from dilated_compile.lowering.dilated import plan as lowering

    monkeypatch.setattr(lowering, "SMALL_PART_TILES", 0)
    monkeypatch.setattr(lowering, "choose_kernel", lambda q: "cudnn")  # views path on CPU too
    monkeypatch.setenv("DILATED_KERNEL", "cpu")
    seg, rates = (8, 16, 32), (1, 6, 12)
    g = torch.Generator().manual_seed(0)
    if layout == "bnhd":
        q, k, v = (torch.randn(2, 70, 5, 8, generator=g).transpose(1, 2).requires_grad_() for _ in range(3))
    else:
        q, k, v = (torch.randn(2, 5, 70, 8, generator=g).requires_grad_() for _ in range(3))
    out = dilated_attention(q, k, v, seg, rates, head_split=head_split, is_causal=is_causal)
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = dilated_reference(qd, kd, vd, seg, rates, head_split=head_split, is_causal=is_causal)
    assert_within(out, ref, q.detach(), k.detach(), v.detach(), is_causal=is_causal)
    grad = torch.randn_like(ref)
    out.backward(grad.float())
    ref.backward(grad)
    for a, b in ((q, qd), (k, kd), (v, vd)):
        torch.testing.assert_close(a.grad.double(), b.grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("layout", ["contiguous", "strided_view"])
def test_block_attention_ops_pass_opcheck(is_causal, layout):
    """The fused-kernel custom ops: schema, fake (meta) outputs with the real
    layouts, and tracing; inputs dense or strided views like the dilated gathers."""
    from dilated_compile.lowering.common.block_kernels import choose_kernel

    g = torch.Generator().manual_seed(0)
    if layout == "contiguous":
        q, k, v = (torch.randn(2, 3, 37, 16, generator=g) for _ in range(3))
    else:  # every 2nd position of (B, N, H, D) storage, as (B, H, m, D)
        q, k, v = (torch.randn(2, 74, 3, 16, generator=g).transpose(1, 2)[:, :, ::2] for _ in range(3))
    kernel = choose_kernel(q)
    ops = torch.ops.dilated_compile
    torch.library.opcheck(ops.block_attention.default, (q, k, v, is_causal, 0.25, kernel))
    out, lse = ops.block_attention(q, k, v, is_causal, 0.25, kernel)
    dout = torch.randn(out.shape, generator=g)
    torch.library.opcheck(
        ops.block_attention_backward.default, (dout, q, k, v, out, lse, is_causal, 0.25, kernel)
    )



def test_unknown_dilated_combine_setting_raises(monkeypatch):
    monkeypatch.setenv("DILATED_COMBINE", "tritn")
    q = torch.randn(1, 2, 8, 4)
    with pytest.raises(ValueError, match="DILATED_COMBINE='tritn': expected triton or inductor"):
        dilated_attention(q, q, q, [4], [1])


@pytest.mark.parametrize(
    "device,dtype,opaque",
    [("cuda", torch.float32, True), ("cuda", torch.bfloat16, True), ("cuda", torch.float16, True),
     ("cpu", torch.float32, False)],
)
def test_cuda_sites_trace_to_the_opaque_op(device, dtype, opaque):
    """On CUDA (fp16, bf16 and fp32) a traced dilated attention is the opaque op alone, so
    Inductor generates no spread/merge: Triton 3.6 miscompiled one of those kernels for
    float32 on an H200 (tests/test_triton_miscompile.py). Traced on fake CUDA tensors."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    from dilated_compile.lowering.common import combine

    def f(q, k, v):
        return dilated_attention(q, k, v, (64, 128), (1, 2), head_split="longnet", is_causal=True)

    with FakeTensorMode():
        q, k, v = (torch.empty(2, 5, 300, 64, device=device, dtype=dtype) for _ in range(3))
        graph = make_fx(f)(q, k, v).graph
    targets = {str(n.target) for n in graph.nodes if n.op == "call_function"}
    uses_op = "dilated_compile.dilated_attention.default" in targets
    assert uses_op == (opaque and combine.TRITON_INSTALLED), targets
    if uses_op:
        assert not any("pad" in t or "cat" in t for t in targets), targets


def test_ops_run_without_view_replay_inside_a_compiled_training_graph(monkeypatch):
    """AOTAutograd turns view replay on around a training graph's forward, which makes
    every view op inside our opaque ops about 10x slower. The ops turn it off for their
    own work, forward and backward, and the result is unchanged."""
    from dilated_compile.lowering.dilated import op as dynamic

    seen = []

    def recording(real):
        def run(*args):
            seen.append(torch._C._is_view_replay_enabled())
            return real(*args)
        return run

    monkeypatch.setattr(dynamic, "dilated_forward", recording(dynamic.dilated_forward))
    monkeypatch.setattr(dynamic, "dilated_backward", recording(dynamic.dilated_backward))

    def f(q, k, v):
        return dynamic.dynamic_dilated_attention(q, k, v, [16, 32], [1, 2], head_split="longnet", is_causal=True)

    q, k, v = (torch.randn(1, 3, 40, 8, requires_grad=True) for _ in range(3))
    torch._dynamo.reset()
    out = torch.compile(f, backend="aot_eager", fullgraph=True)(q, k, v)
    out.sum().backward()
    assert seen == [False, False]
    want = f(q, k, v)
    assert torch.equal(out, want)
    assert not torch._C._is_view_replay_enabled()


def test_every_custom_op_of_the_package_is_defined_through_opaque_op():
    """`view_replay.opaque_op` is the one place our ops are defined, so each runs
    without view replay; an op defined with torch.library.custom_op directly would not."""
    from pathlib import Path

    import dilated_compile

    root = Path(dilated_compile.__file__).parent
    direct = [
        f"{path.relative_to(root)}:{i}"
        for path in sorted(root.rglob("*.py")) if path.name != "view_replay.py"
        for i, line in enumerate(path.read_text().splitlines(), 1)
        if "library.custom_op(" in line or "torch.library.define(" in line
    ]
    assert not direct, f"define these ops with view_replay.opaque_op: {direct}"
    ops = [name for name in dir(torch.ops.dilated_compile) if not name.startswith("_")]
    assert {"dilated_attention", "block_attention", "ring_attention", "block_sparse_attention"} <= set(ops)


def test_parts_that_fill_whole_waves_get_their_own_call():
    """The call grouping on a GPU of 132 multiprocessors (H100/H200), LongNet's
    segments at 32k: a part of more than one wave of 128-row query tiles whose last
    wave is at least 90% full runs on views (no copy), parts of one wave or a
    ragged last wave are batched by block length, and every part is in one call."""
    from dilated_compile.lowering.dilated import plan as lowering

    seg, rates = (2048, 4096, 8192, 16384, 32768), (1, 2, 4, 6, 12)
    plan = lowering.make_plan(16, 32768, seg, rates, "longnet", lowering.SMALL_PART_TILES, 132)
    tiles = [sum(lowering._tiles(p) for p in parts) for parts in plan.calls]
    alone = [t for t, parts in zip(tiles, plan.calls) if len(parts) == 1]
    # patterns 0, 1 (>= 528 tiles) and the four offsets of pattern 2 (256 = 1.94 waves)
    assert sorted(alone) == [256, 256, 256, 256, 1024, 1024, 4096]
    batched = [parts for parts in plan.calls if len(parts) > 1]
    assert all(len({p.m for p in parts}) == 1 for parts in batched)
    assert all(lowering._tiles(p) <= 132 for parts in batched for p in parts)
    every = [p for job in plan.jobs for p in job.parts]
    assert sorted(map(repr, every)) == sorted(repr(p) for parts in plan.calls for p in parts)
    # without the wave rule the four 256-tile parts share one batched call
    old = lowering.make_plan(16, 32768, seg, rates, "longnet", lowering.SMALL_PART_TILES, 0)
    assert len(old.calls) == len(plan.calls) - 3


def test_combine_descriptors_are_remembered_by_calls_tuple_and_layout():
    """The Triton kernels' descriptors are made once per (plan's calls tuple, result
    strides, batch, heads, device): the same tensor on the next call; an equal but new
    tuple (an id that could be reused) and other strides are made afresh."""
    from dilated_compile.lowering.common import combine
    from dilated_compile.lowering.dilated import compute
    from dilated_compile.lowering.dilated import plan as lowering

    plan = lowering.make_plan(5, 40, (8, 16), (1, 2), "longnet", 0)
    x = torch.randn(2, 5, 40, 16)
    outs = compute.gather_calls(plan, x)
    lses = [o[..., 0] for o in outs]
    first = combine._descriptor(plan.calls, outs, lses, 2, 5)
    assert combine._descriptor(plan.calls, outs, lses, 2, 5) is first
    assert first.table.dtype == torch.int64
    assert first.n_parts == sum(len(parts) for parts in plan.calls)
    assert first.align == 16  # every block offset a multiple of D = 16
    twin = tuple(tuple(parts) for parts in plan.calls)
    again = combine._descriptor(twin, outs, lses, 2, 5)
    assert torch.equal(again.table, first.table) and again is not first
    relaid = [o.transpose(1, 2).contiguous().transpose(1, 2) for o in outs]  # same values, other strides
    other = combine._descriptor(plan.calls, relaid, lses, 2, 5)
    assert not torch.equal(other.table, first.table)
    fields = combine._descriptor_of(
        plan.calls, tuple(o.stride() for o in relaid), tuple(l.stride() for l in lses), 2
    )
    assert other.table.tolist()[: len(fields)] == list(fields)
    odd = [torch.randn(o.shape[:-1] + (17,))[..., :16] for o in outs]  # rows 17 elements apart
    assert combine._descriptor(plan.calls, odd, lses, 2, 5).align == 1


def test_combine_descriptor_lists_each_heads_parts():
    """After the parts and one empty part, the descriptor lists, per head, the rows of
    the parts whose head set holds it, padded with the empty part: the rows a
    kernel program of that head visits."""
    from dilated_compile.lowering.common import combine
    from dilated_compile.lowering.dilated import compute
    from dilated_compile.lowering.dilated import plan as lowering

    for split in ("groups", "longnet"):
        plan = lowering.make_plan(6, 64, (8, 16, 32), (1, 2, 4), split, 0)
        outs = compute.gather_calls(plan, torch.randn(1, 6, 64, 16))
        desc = combine._descriptor(plan.calls, outs, None, 1, 6)
        parts = [p for ps in plan.calls for p in ps]
        table = desc.table.tolist()
        empty = table[desc.n_parts * combine.FIELDS:(desc.n_parts + 1) * combine.FIELDS]
        assert empty == list(combine._EMPTY_PART)
        lists = table[(desc.n_parts + 1) * combine.FIELDS:]
        assert len(lists) == 6 * desc.per_head
        for h in range(6):
            rows = lists[h * desc.per_head:(h + 1) * desc.per_head]
            holding = [k for k, p in enumerate(parts) if h in range(p.h_start, p.h_stop, p.h_step)]
            assert [k for k in rows if k != desc.n_parts] == holding
            assert holding  # every head has a part in both splits


def test_combine_descriptor_is_not_made_during_cuda_graph_capture(monkeypatch):
    """A plan's first combine launch inside a CUDA graph capture raises (its descriptor
    would be copied to the device in the capture, into the graph's memory pool)."""
    from dilated_compile.lowering.common import combine
    from dilated_compile.lowering.dilated import compute
    from dilated_compile.lowering.dilated import plan as lowering

    class OnCuda:  # what `_descriptor` reads of a result, claiming a CUDA device
        device = torch.device("cuda")

        def __init__(self, t: torch.Tensor):
            self.stride = t.stride

    plan = lowering.make_plan(5, 40, (8, 16), (1, 2), "groups", 0)
    outs = [OnCuda(o) for o in compute.gather_calls(plan, torch.randn(1, 5, 40, 16))]
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with pytest.raises(RuntimeError, match="run the model once before capturing"):
        combine._descriptor(plan.calls, outs, None, 1, 5)


def test_ops_keeping_device_tensors_per_plan_run_outside_cuda_graphs():
    """The dilated and ring ops, whose kernels keep per-plan device tensors, are tagged so
    that Inductor runs them between CUDA graphs."""
    import dilated_compile.lowering.dilated.op  # noqa: F401  (registers the ops)
    import dilated_compile.lowering.ring.op  # noqa: F401

    ops = torch.ops.dilated_compile
    for op in (ops.dilated_attention, ops.dilated_attention_backward,
               ops.ring_attention, ops.ring_attention_backward):
        assert torch.Tag.cudagraph_unsafe in op.default.tags, op


def test_kernel_choice_traces_without_graph_break():
    """Dynamo can trace the cuDNN check (the SDPA flags are not read while it traces)."""
    from dilated_compile.lowering.common.block_kernels import _cudnn_sdp_on

    def pick(x):
        return x * 2 if _cudnn_sdp_on(torch.device("cuda", 0)) else x + 1

    x = torch.arange(3.0)
    want = pick(x) if torch.cuda.is_available() else x + 1  # no GPU: no cuDNN attention
    torch.testing.assert_close(torch.compile(pick, backend="eager", fullgraph=True)(x), want)


def test_returned_output_is_a_view_only_where_dynamo_loses_gradients():
    """The autograd nodes return a view of the tensor they save only while Dynamo traces on
    torch < 2.12 (pytorch#180642). Elsewhere (eager, the backend's AOTAutograd trace, newer
    torch) they return the saved tensor itself: a returned view of a saved buffer gave wrong
    ring outputs on 2 H200s."""
    from dilated_compile.lowering.common.autograd_output import DYNAMO_LOSES_GRADIENTS, returned_output

    x = torch.randn(4)
    assert returned_output(x) is x
    seen = []

    def traced(x):
        y = returned_output(x)
        seen.append(y is x)
        return y + 1

    torch.compile(traced, backend="eager", fullgraph=True)(x)
    assert seen == [not DYNAMO_LOSES_GRADIENTS]
    assert DYNAMO_LOSES_GRADIENTS == torch.__version__.startswith("2.11")
