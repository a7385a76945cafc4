"""Block-sparse attention on CUDA (skipped without it): the FlexAttention
lowering, eager and compiled through the backend, forward and backward,
against the float64 reference."""

import pytest
import torch
import torch.nn.functional as F

import dilated_compile
from dilated_compile.lowering.block_sparse.attention import block_sparse_attention, choose_path
from dilated_compile.lowering.reference import block_sparse_reference

from .tolerance import assert_within

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

PATTERNS = {
    "local_window": {"kind": "local_window", "window": 1},
    "dilated": {"kind": "dilated", "stride": 3, "window": 0},
    "global_local": {"kind": "global_local", "global_blocks": 1, "window": 1},
    "mask_mod": {"kind": "mask_mod", "function": "tests.masks:stripes"},
}


def _qkv(n, h, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return [
        torch.randn(2, h, n, 64, device="cuda", dtype=dtype, generator=g).requires_grad_()
        for _ in range(3)
    ]


def _check(out, q, k, v, block_size, pattern, is_causal):
    qd, kd, vd = (t.detach().double().cpu().requires_grad_() for t in (q, k, v))
    ref = block_sparse_reference(qd, kd, vd, block_size=block_size, pattern=pattern, is_causal=is_causal)
    assert_within(out, ref, q.detach(), k.detach(), v.detach(), is_causal=is_causal)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref_grads = torch.autograd.grad(ref, (qd, kd, vd), dout.double().cpu())
    for name, g, r in zip("qkv", grads, ref_grads):
        assert_within(g, r, q.detach(), k.detach(), v.detach(), is_causal=is_causal, what=f"d{name}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("block_size,n", [(64, 300), (128, 1000), (48, 520)], ids=str)
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("kind", list(PATTERNS))
def test_eager_cuda(kind, is_causal, block_size, n, dtype):
    """fp16/bf16 run on FlexAttention, float32 on the gathered (exact) path."""
    q, k, v = _qkv(n, 3, dtype)
    assert choose_path(q) == ("gather" if dtype == torch.float32 else "flex")
    out = block_sparse_attention(q, k, v, block_size=block_size, pattern=PATTERNS[kind], is_causal=is_causal)
    _check(out, q, k, v, block_size, PATTERNS[kind], is_causal)


class Attention(torch.nn.Module):
    def __init__(self, is_causal):
        super().__init__()
        self.is_causal = is_causal

    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=self.is_causal)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("kind", list(PATTERNS))
def test_compiled_backend(kind, is_causal, dtype):
    torch._dynamo.reset()
    policy = {"version": 1, "rules": [{"match": "**", "attention": "block_sparse", "block_size": 128, "pattern": PATTERNS[kind]}]}
    model = torch.compile(Attention(is_causal), backend="dilated", options={"policy": policy})
    q, k, v = _qkv(700, 3, dtype)
    out = model(q, k, v)
    assert dilated_compile.reports()[-1].sites[0].status == "rewritten"
    _check(out, q, k, v, 128, PATTERNS[kind], is_causal)


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("is_causal", [False, True])
def test_global_rows_split_over_keys(is_causal, compiled):
    """Long enough that the global rows of a non-causal pattern take the key-split path."""
    torch._dynamo.reset()
    pattern = {"kind": "global_local", "global_blocks": 2, "window": 1}
    q, k, v = _qkv(2000, 2, torch.bfloat16)
    fn = lambda q, k, v: block_sparse_attention(q, k, v, block_size=64, pattern=pattern, is_causal=is_causal)  # noqa: E731
    out = (torch.compile(fn) if compiled else fn)(q, k, v)
    _check(out, q, k, v, 64, pattern, is_causal)


@pytest.mark.parametrize("compiled", [False, True])
def test_rows_without_keys_are_zero_on_gpu(compiled):
    torch._dynamo.reset()
    pattern = {"kind": "mask_mod", "function": "tests.masks:nothing_before_16"}
    q, k, v = _qkv(300, 2, torch.bfloat16)
    fn = lambda q, k, v: block_sparse_attention(q, k, v, block_size=64, pattern=pattern)  # noqa: E731
    out = (torch.compile(fn) if compiled else fn)(q, k, v)
    grads = torch.autograd.grad(out.float().sum(), (q, k, v))
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads)
    assert (out[:, :, :16] == 0).all() and (grads[0][:, :, :16] == 0).all()


def test_float64_on_cuda_uses_the_gather_lowering():
    q, k, v = _qkv(200, 2, torch.float64)
    assert choose_path(q) == "gather"
    out = block_sparse_attention(q, k, v, block_size=32, pattern=PATTERNS["global_local"], is_causal=True)
    _check(out, q, k, v, 32, PATTERNS["global_local"], True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("kind", ["local_window", "dilated", "global_local"])
def test_dynamic_length_op_cuda(kind, is_causal, dtype):
    """The custom op symbolic-length sites call (lowering/dynamic_block_sparse.py):
    FlexAttention (bf16: lse from flex, backward by flex's recompute) or gather
    (float32: backward from out/lse), at lengths that are and are not multiples
    of the block size, including global rows split over keys (n=1000)."""
    from dilated_compile.lowering.block_sparse.op import dynamic_block_sparse_attention

    for n in (300, 256, 1000):
        q, k, v = _qkv(n, 3, dtype, seed=n)
        kw = {"block_size": 64, "pattern": PATTERNS[kind], "is_causal": is_causal}
        out = dynamic_block_sparse_attention(q, k, v, **kw)
        _check(out, q, k, v, 64, PATTERNS[kind], is_causal)
