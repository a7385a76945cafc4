"""GPU checks (skipped without CUDA): every block kernel, forward and backward,
eager and compiled, against the float64 reference."""

import os

import pytest
import torch

import dilated_compile
from dilated_compile import dilated_attention, dilated_reference
from dilated_compile.lowering.dilated import plan as dilated_lowering
from dilated_compile.lowering.common import block_kernels as kernels

from .tolerance import assert_within

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

CASES = [
    # (N, H, segments, rates)
    (300, 5, (64, 128, 256), (1, 2, 4)),
    (512, 16, (128, 256, 512), (1, 6, 12)),
    (77, 3, (16, 1024), (2, 16)),
]


def _qkv(n, h, dtype, d=64, requires_grad=False, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return [
        torch.randn(2, h, n, d, device="cuda", dtype=dtype, generator=g).requires_grad_(requires_grad)
        for _ in range(3)
    ]


@pytest.mark.parametrize("small_tiles", [None, 0], ids=["batched", "views"])
@pytest.mark.parametrize("kernel", ["cudnn", "flash", "efficient", "math"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("head_split", ["groups", "longnet"])
@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("case", CASES)
def test_kernel_forward_backward(monkeypatch, kernel, dtype, head_split, is_causal, case, small_tiles):
    """small_tiles=0 gives every part its own call on strided views of q/k/v."""
    if kernel in ("cudnn", "flash") and dtype == torch.float32:
        pytest.skip("fp16/bf16 kernel")
    if kernel == "cudnn" and not kernels._cudnn_usable(torch.empty(1, 1, 1, 64, device="cuda")):
        pytest.skip("cuDNN attention unavailable")
    monkeypatch.setenv("DILATED_KERNEL", kernel)
    if small_tiles is not None:
        if kernel != "cudnn":
            pytest.skip("only cuDNN runs large parts on strided views")
        monkeypatch.setattr(dilated_lowering, "SMALL_PART_TILES", small_tiles)
    n, h, seg, rates = case
    q, k, v = _qkv(n, h, dtype, requires_grad=True)
    out = dilated_attention(q, k, v, seg, rates, head_split=head_split, is_causal=is_causal)
    qd, kd, vd = (t.detach().double().cpu().requires_grad_() for t in (q, k, v))
    ref = dilated_reference(qd, kd, vd, seg, rates, head_split=head_split, is_causal=is_causal)
    assert_within(out, ref, q.detach(), k.detach(), v.detach(), is_causal=is_causal)
    grad = torch.randn_like(out)
    out.backward(grad)
    ref.backward(grad.double().cpu())
    for name, t, td in (("dq", q, qd), ("dk", k, kd), ("dv", v, vd)):
        err = (t.grad.double().cpu() - td.grad).abs().max().item()
        scale = td.grad.abs().max().item()
        tol = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 6e-2}[dtype]
        assert err <= tol * max(scale, 1.0), f"{name}: {err} (scale {scale})"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("head_split", ["groups", "longnet"])
def test_compiled_matches_eager(head_split, dtype):
    """backend="dilated" against the eager function, output and gradients. float32 runs the
    opaque op like half precision: Inductor's own spread/merge hit a Triton miscompile
    (tests/test_triton_miscompile.py)."""
    n, h, seg, rates = CASES[1]
    q, k, v = _qkv(n, h, dtype, requires_grad=True, seed=1)

    def f(q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)

    policy = {
        "version": 1,
        "rules": [{"match": "re:.*", "attention": "dilated", "segment_lengths": list(seg),
                   "dilation_rates": list(rates), "head_split": head_split}],
    }
    torch._dynamo.reset()
    cf = torch.compile(f, backend="dilated", options={"policy": policy})
    out = cf(q, k, v)
    # a gradient in the output's own (B, N, H, D) layout, taken as it is (no copy) since e8200d3
    dout = torch.randn_like(out)
    assert dout.stride() == out.stride() and not dout.is_contiguous()
    out.backward(dout)
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    eager = dilated_attention(q, k, v, seg, rates, head_split=head_split, is_causal=True)
    eager.backward(dout)
    assert (out.float() - eager.float()).abs().max().item() < 2e-2
    for g, t in zip(grads, (q, k, v)):
        assert (g.float() - t.grad.float()).abs().max().item() < 5e-2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("head_split", ["groups", "longnet"])
def test_called_inside_torch_compile(head_split, dtype):
    """A compiled function calling dilated_attention on CUDA (Dynamo traces the kernel choice,
    fullgraph) matches the float64 reference, output and q/k/v gradients (2.11 gave zero
    gradients; Dynamo cannot read the cuDNN flag)."""
    n, h, seg, rates = CASES[0]
    q, k, v = _qkv(n, h, dtype, requires_grad=True, seed=2)

    def attend(q, k, v):
        return dilated_attention(q, k, v, seg, rates, head_split=head_split, is_causal=True)

    torch._dynamo.reset()
    out = torch.compile(attend, fullgraph=True)(q, k, v)
    dout = torch.randn_like(out)
    out.backward(dout)
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = dilated_reference(qd, kd, vd, seg, rates, head_split=head_split, is_causal=True)
    ref.backward(dout.double())
    assert_within(out, ref, q, k, v, is_causal=True)
    for t, r in ((q, qd), (k, kd), (v, vd)):
        rel = ((t.grad.double() - r.grad).norm() / r.grad.norm()).item()
        assert rel < (2e-2 if dtype == torch.bfloat16 else 1e-4), rel


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_reduce_overhead_trains_like_eager_in_cuda_graphs(dynamic, dtype):
    """mode='reduce-overhead' (CUDA graphs): a few optimizer steps of a small
    model run in CUDA graphs (no cudagraph skips) and give the losses of the same
    model trained eagerly with `dilated_attention` in its attention. Both dtypes run
    the opaque op with its Triton kernels."""
    import copy

    from torch._dynamo.utils import counters

    from .models import TinyModel, dilated_rule, policy, restore, with_attention_replaced

    torch._dynamo.reset()
    counters.clear()
    seg, rates = (64, 128), (1, 2)
    torch.manual_seed(0)
    model = TinyModel(dim=64, heads=(5, 3), head_dim=64).cuda().to(dtype)
    reference = copy.deepcopy(model)
    saved = with_attention_replaced(
        reference,
        lambda q, k, v, m: dilated_attention(q, k, v, seg, rates, head_split="longnet", is_causal=True),
    )
    pol = policy(dilated_rule(seg=seg, rates=rates, head_split="longnet"))
    compiled = torch.compile(
        model, backend="dilated", options={"policy": pol, "mode": "reduce-overhead"}, dynamic=dynamic
    )
    opts = [torch.optim.SGD(m.parameters(), lr=0.05) for m in (model, reference)]
    lengths = (300, 300, 300, 300) if not dynamic else (300, 300, 200, 200, 300)
    try:
        for n in lengths:
            x, target = (torch.randn(2, n, 64, device="cuda", dtype=dtype) for _ in range(2))
            torch.compiler.cudagraph_mark_step_begin()
            losses = []
            for m, net in (("compiled", compiled), ("reference", reference)):
                loss = (net(x) - target).pow(2).mean()
                loss.backward()
                losses.append(loss.item())
            tol = 1e-4 if dtype == torch.float32 else 2e-2
            torch.testing.assert_close(losses[0], losses[1], atol=tol, rtol=tol, msg=f"loss at N={n}")
            for opt in opts:
                opt.step()
                opt.zero_grad()
    finally:
        restore(saved)
    assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])
    reports = dilated_compile.reports()
    assert reports and all(s.status == "rewritten" for s in reports[-1].sites)


@pytest.mark.parametrize("path", ["gathered blocks", "work list"])
@pytest.mark.parametrize("head_split", ["groups", "longnet"])
def test_eager_call_replays_in_a_cuda_graph_after_its_first_call(monkeypatch, head_split, path):
    """A plan's first call makes the device tables its kernels read (the combine's
    descriptor, the work list's items); after it, a `torch.cuda.graph` capture of the
    same call replays with new inputs to what an eager call gives. A plan's first
    call inside a capture raises, telling the user to run once before capturing."""
    monkeypatch.setenv("DILATED_WORKLIST", "off" if path == "gathered blocks" else "on")
    n, h, seg, rates = 512, 16, (128, 256, 512), (1, 6, 12)
    q, k, v = _qkv(n, h, torch.bfloat16)
    dilated_attention(q, k, v, seg, rates, head_split=head_split, is_causal=True)  # the plan's first call
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = dilated_attention(q, k, v, seg, rates, head_split=head_split, is_causal=True)
    for seed in (1, 2):
        for dst, src in zip((q, k, v), _qkv(n, h, torch.bfloat16, seed=seed)):
            dst.copy_(src)
        graph.replay()
        expected = dilated_attention(q, k, v, seg, rates, head_split=head_split, is_causal=True)
        assert torch.equal(out, expected), f"replay with inputs of seed {seed}"
    other = [t[:, :, :300] for t in (q, k, v)]  # a new length: a new plan
    with pytest.raises(RuntimeError, match="once before capturing"):
        with torch.cuda.graph(torch.cuda.CUDAGraph()):
            dilated_attention(*other, seg, rates, head_split=head_split, is_causal=True)


@pytest.mark.parametrize("ours_first", [True, False], ids=["ours_first", "torch_first"])
def test_cudnn_backward_graphs_are_shared_safely_with_torch_sdpa(monkeypatch, ours_first):
    """torch caches cuDNN backward graphs by q/k/v layout alone, with the out/grad_out
    strides of the first call baked in. Our block backward on strided views (the dilated
    view path: out and grad_out gathered like q) and torch's own SDPA backward on views
    with the same layout (the seed algorithm) run in one process, in either order: both
    give the float64 reference's gradients. (Before: an illegal memory access.)"""
    if not kernels._cudnn_usable(torch.empty(1, 1, 1, 64, device="cuda")):
        pytest.skip("cuDNN attention unavailable")
    monkeypatch.setenv("DILATED_KERNEL", "cudnn")
    from torch.nn.attention import SDPBackend, sdpa_kernel

    g = torch.Generator(device="cuda").manual_seed(0)

    def views():  # every 2nd position of (B, N, H, D) storage, seen as (B, H, N/2, D)
        return [
            torch.randn(1, 2048, 4, 64, device="cuda", dtype=torch.bfloat16, generator=g)
            .transpose(1, 2)[:, :, ::2]
            for _ in range(5)
        ]

    def reference(q, k, v, dout):
        qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
        torch.nn.functional.scaled_dot_product_attention(qd, kd, vd).backward(dout.double())
        return [t.grad for t in (qd, kd, vd)]

    def ours():
        q, k, v, out_view, dout = views()
        out, lse = kernels.block_attention(q, k, v, is_causal=False, scale=0.125)
        out_view.copy_(out)  # the output gathered like q: exactly q's strides
        grads = kernels.block_attention_backward(dout, q, k, v, out_view, lse, is_causal=False, scale=0.125)
        return grads, reference(q, k, v, dout)

    def torch_sdpa():
        q, k, v, _, dout = (t.requires_grad_() for t in views())
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            torch.nn.functional.scaled_dot_product_attention(q, k, v).backward(dout)
        return [t.grad for t in (q, k, v)], reference(q, k, v, dout)

    runs = [ours, torch_sdpa] if ours_first else [torch_sdpa, ours]
    for run in runs:
        grads, ref = run()
        torch.cuda.synchronize()
        for name, got, want in zip(("dq", "dk", "dv"), grads, ref):
            err = (got.double() - want).abs().max().item()
            assert err <= 6e-2 * max(want.abs().max().item(), 1.0), f"{run.__name__} {name}: {err}"
