"""Block-sparse attention (docs/spec.md, "Block-sparse attention") against the float64 reference."""

from __future__ import annotations

import itertools
import os
import threading

import pytest
import torch
import torch.nn.functional as F

import dilated_compile
from dilated_compile.lowering.block_sparse import flex as block_flex, gather as block_gather
from dilated_compile.lowering.block_sparse.patterns import as_pattern, evaluate_mask_mod, token_mask_mod
from dilated_compile.lowering.block_sparse.attention import block_sparse_attention
from dilated_compile.lowering.reference import (
    attention_with_counts,
    block_sparse_counts,
    block_sparse_reference,
)
from dilated_compile.policy import BlockPattern
from tests import masks
from tests.child_pytest import run_tests
from tests.tolerance import assert_within

PATTERNS = {
    "local_window": {"kind": "local_window", "window": 1},
    "dilated": {"kind": "dilated", "stride": 3, "window": 0},
    "global_local": {"kind": "global_local", "global_blocks": 1, "window": 1},
    "mask_mod": {"kind": "mask_mod", "function": "tests.masks:stripes"},
}


def _qkv(b, h, n, d, dtype, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    return tuple(
        torch.randn(b, h, n, d, generator=g).to(dtype).requires_grad_(requires_grad) for _ in range(3)
    )


def _matrix():
    """Every pattern kind, causality, head count and (block size, length); the dtype turns
    over along it, so that each dtype meets every value of every other parameter (and every
    pattern kind with each of the others)."""
    dtypes = (torch.float32, torch.bfloat16, torch.float64)
    cases = itertools.product(PATTERNS, [False, True], [1, 3], [(16, 100), (32, 64), (48, 130), (128, 200)])
    params = []
    for i, (kind, causal, heads, (block_size, n)) in enumerate(cases):
        dtype = dtypes[i % 3]
        name = f"{kind}-{'causal' if causal else 'full'}-{heads}-{block_size}-{n}-{str(dtype)[6:]}"
        params.append(pytest.param(kind, causal, heads, block_size, n, dtype, id=name))
    return params


@pytest.mark.parametrize("kind,is_causal,heads,block_size,n,dtype", _matrix())
def test_matches_reference(kind, is_causal, heads, block_size, n, dtype):
    q, k, v = _qkv(2, heads, n, 8, dtype)
    out = block_sparse_attention(q, k, v, block_size=block_size, pattern=PATTERNS[kind], is_causal=is_causal)
    ref = block_sparse_reference(q, k, v, block_size=block_size, pattern=PATTERNS[kind], is_causal=is_causal)
    assert out.dtype == dtype and out.shape == q.shape
    assert_within(out, ref, q, k, v, is_causal=is_causal)


@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("kind", list(PATTERNS))
def test_gradients_match_reference(kind, is_causal):
    q, k, v = _qkv(2, 3, 70, 8, torch.float32, requires_grad=True)
    kw = dict(block_size=16, pattern=PATTERNS[kind], is_causal=is_causal)
    out = block_sparse_attention(q, k, v, **kw)
    ref = block_sparse_reference(q, k, v, **kw)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref_grads = torch.autograd.grad(ref, (q, k, v), dout.double())
    for name, g, r in zip("qkv", grads, ref_grads):
        assert_within(g, r, q, k, v, is_causal=is_causal, what=f"d{name}")


@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("kind", list(PATTERNS))
def test_gradcheck_float64(kind, is_causal):
    q, k, v = _qkv(1, 2, 21, 4, torch.float64, requires_grad=True)
    fn = lambda q, k, v: block_sparse_attention(  # noqa: E731
        q, k, v, block_size=8, pattern=PATTERNS[kind], is_causal=is_causal
    )
    assert torch.autograd.gradcheck(fn, (q, k, v), fast_mode=True)  # a random projection of the Jacobian


def test_causal_is_on_global_positions_not_a_triangle_per_block():
    """Query 20 (block 1) sees key 5 (block 0) under a causal window of 1: the
    library this replaces masked each block with its own triangle (5 > 20 % 16)."""
    q, k, v = _qkv(1, 1, 32, 8, torch.float64)
    pattern = {"kind": "local_window", "window": 1}
    out = block_sparse_attention(q, k, v, block_size=16, pattern=pattern, is_causal=True)
    pos = torch.arange(32)
    global_causal = (pos[None, :] <= pos[:, None]).long()
    per_block = ((pos[None, :] % 16 <= pos[:, None] % 16) & (pos[None, :] // 16 <= pos[:, None] // 16)).long()
    assert global_causal[20, 5] == 1 and per_block[20, 5] == 0
    torch.testing.assert_close(out, attention_with_counts(q, k, v, global_causal, None))
    assert not torch.allclose(out, attention_with_counts(q, k, v, per_block, None))


def test_one_softmax_per_row_over_all_active_blocks():
    """Not a sum of per-block softmaxes (each block normalised on its own)."""
    q, k, v = _qkv(1, 2, 48, 8, torch.float64)
    pattern = {"kind": "local_window", "window": 1}
    out = block_sparse_attention(q, k, v, block_size=16, pattern=pattern)
    torch.testing.assert_close(out, block_sparse_reference(q, k, v, block_size=16, pattern=pattern))
    per_block = torch.zeros_like(q)
    for qb in range(3):
        rows = slice(16 * qb, 16 * qb + 16)
        for kb in range(max(0, qb - 1), min(3, qb + 2)):
            cols = slice(16 * kb, 16 * kb + 16)
            per_block[:, :, rows] += F.scaled_dot_product_attention(q[:, :, rows], k[:, :, cols], v[:, :, cols])
    assert not torch.allclose(out, per_block, atol=1e-3)


@pytest.mark.parametrize("is_causal", [False, True])
def test_row_without_keys_is_zero_with_zero_gradient(is_causal):
    q, k, v = _qkv(1, 2, 40, 8, torch.float32, requires_grad=True)
    out = block_sparse_attention(
        q, k, v, block_size=16, pattern={"kind": "mask_mod", "function": "tests.masks:nothing_before_16"},
        is_causal=is_causal,
    )
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads)
    assert (out[:, :, :16] == 0).all() and (grads[0][:, :, :16] == 0).all()
    assert (grads[1][:, :, :8] == 0).all() and (grads[2][:, :, :8] == 0).all()
    assert out[:, :, 16:].abs().sum() > 0


def test_whole_empty_query_blocks_under_causal_global_blocks():
    """Causal dilated stride pattern where later rows use far blocks only."""
    q, k, v = _qkv(1, 1, 100, 8, torch.float64)
    pattern = {"kind": "dilated", "stride": 4, "window": 0}
    for causal in (False, True):
        out = block_sparse_attention(q, k, v, block_size=16, pattern=pattern, is_causal=causal)
        ref = block_sparse_reference(q, k, v, block_size=16, pattern=pattern, is_causal=causal)
        torch.testing.assert_close(out, ref)


@pytest.mark.parametrize("n", [1, 5, 16, 17])
def test_short_sequences(n):
    q, k, v = _qkv(1, 2, n, 8, torch.float64)
    for kind, pattern in PATTERNS.items():
        out = block_sparse_attention(q, k, v, block_size=16, pattern=pattern, is_causal=True)
        torch.testing.assert_close(out, block_sparse_reference(q, k, v, block_size=16, pattern=pattern, is_causal=True))


def test_callable_mask_mod_and_pattern_objects():
    q, k, v = _qkv(1, 2, 50, 8, torch.float64)
    out = block_sparse_attention(q, k, v, block_size=16, pattern=masks.stripes)
    ref = block_sparse_reference(q, k, v, block_size=16, pattern=PATTERNS["mask_mod"])
    torch.testing.assert_close(out, ref)
    obj = BlockPattern(kind="local_window", window=1)
    torch.testing.assert_close(
        block_sparse_attention(q, k, v, block_size=16, pattern=obj),
        block_sparse_reference(q, k, v, block_size=16, pattern=PATTERNS["local_window"]),
    )


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(block_size=0, pattern={"kind": "local_window", "window": 1}), "block_size"),
        (dict(block_size=16, pattern={"kind": "local_windw", "window": 1}), "did you mean"),
        (dict(block_size=16, pattern={"kind": "dilated", "window": 1}), "stride"),
        (dict(block_size=16, pattern=3), "pattern must be"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    q, k, v = _qkv(1, 1, 8, 4, torch.float32)
    with pytest.raises((ValueError, TypeError), match=match):
        block_sparse_attention(q, k, v, **kwargs)


# --- the FlexAttention block mask -------------------------------------------


def _tiles_by_brute_force(pattern, block_size, n, is_causal):
    tile = block_flex.TILE
    nt = -(-n // tile)
    pos = torch.arange(n)
    allowed = evaluate_mask_mod(token_mask_mod(pattern, block_size, is_causal), 1, 1, pos, pos)[0, 0]
    pad = (0, nt * tile - n, 0, nt * tile - n)
    inside = F.pad(torch.ones(n, n, dtype=torch.bool), pad)
    allowed = F.pad(allowed, pad)
    any_ = allowed.reshape(nt, tile, nt, tile).any(3).any(1)
    all_ = (allowed | ~inside).reshape(nt, tile, nt, tile).all(3).all(1)
    return any_, all_ & any_


@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("block_size,n", [(16, 300), (48, 700), (128, 640), (200, 900)], ids=str)
@pytest.mark.parametrize(
    "pattern",
    [BlockPattern(kind="local_window", window=w) for w in (0, 2)]
    + [BlockPattern(kind="dilated", window=w, stride=s) for w in (0, 1) for s in (1, 2, 5)]
    + [BlockPattern(kind="global_local", window=w, global_blocks=g) for w in (0, 1) for g in (1, 3)],
    ids=lambda p: p.describe(),
)
def test_tile_classes_are_exact(pattern, block_size, n, is_causal):
    """Closed-form tile classes equal the token-level mask reduced per tile:
    no allowed pair is ever skipped, no tile with a masked pair runs unmasked."""
    any_, full = block_flex.tile_classes(pattern, block_size, n, is_causal, torch.device("cpu"))
    want_any, want_full = _tiles_by_brute_force(pattern, block_size, n, is_causal)
    assert torch.equal(any_, want_any) and torch.equal(full, want_full)


@pytest.mark.parametrize("is_causal", [False, True])
def test_mask_mod_tile_classes_per_head(is_causal):
    pattern = as_pattern(PATTERNS["mask_mod"], 16)
    any_, full = block_flex._mask_mod_tile_classes(pattern, 300, 1, 3, is_causal, torch.device("cpu"))
    assert any_.shape == (1, 3, 3, 3)
    for h in range(3):
        def head(b, hh, q, kv, h=h):
            return masks.stripes(b, h, q, kv)
        want_any, want_full = _tiles_by_brute_force(as_pattern(head, 16), 16, 300, is_causal)
        assert torch.equal(any_[0, h], want_any) and torch.equal(full[0, h], want_full)


def test_flex_path_forward_on_cpu(monkeypatch, request):
    """The FlexAttention lowering (compiled flex runs forward-only on CPU), for a token-level
    mask (not causal) and a causal block pattern (each compiles flex; every kind's tiles are checked against
    brute force above, global rows below, and every kind through flex on CUDA). Flex's CPU
    template needs Inductor's vectorized C++, which the suite turns off (tests/conftest.py):
    then the test runs in a child process with it on."""
    if os.environ.get("TORCHINDUCTOR_VEC_ISA_OK") == "0":
        run_tests([request.node.nodeid], {"TORCHINDUCTOR_VEC_ISA_OK": "1"})
        return
    monkeypatch.setenv("DILATED_BLOCK_SPARSE", "flex")
    q, k, v = _qkv(1, 3, 300, 16, torch.float32)
    for kind, causal in (("mask_mod", False), ("dilated", True)):  # each compiles flex
        out = block_sparse_attention(q, k, v, block_size=64, pattern=PATTERNS[kind], is_causal=causal)
        ref = block_sparse_reference(q, k, v, block_size=64, pattern=PATTERNS[kind], is_causal=causal)
        assert_within(out, ref, q, k, v, is_causal=causal, what=f"{kind} causal={causal}")


@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("block_size,n,g,w", [(64, 1000, 1, 0), (48, 1300, 2, 1), (128, 1500, 1, 0)], ids=str)
def test_flex_global_rows_split_over_keys(monkeypatch, block_size, n, g, w, is_causal):
    """Non-causal global rows run as a key-split dense attention merged by
    log-sum-exp; eager (unfused) flex stands in for the compiled one on CPU,
    which has no return_lse."""
    if not is_causal:
        assert 4 * block_flex._keys_per_row(BlockPattern("global_local", window=w, global_blocks=g), block_size) < n
    from torch.nn.attention.flex_attention import flex_attention

    monkeypatch.setenv("DILATED_BLOCK_SPARSE", "flex")
    monkeypatch.setattr(block_flex, "_compiled_flex", lambda: flex_attention)
    pattern = {"kind": "global_local", "global_blocks": g, "window": w}
    q, k, v = _qkv(1, 2, n, 16, torch.float32)  # flex has no backward on CPU: forward here, both on GPU
    out = block_sparse_attention(q, k, v, block_size=block_size, pattern=pattern, is_causal=is_causal)
    ref = block_sparse_reference(q, k, v, block_size=block_size, pattern=pattern, is_causal=is_causal)
    assert_within(out, ref, q, k, v, is_causal=is_causal)


def test_masks_built_on_the_inputs_device():
    mask = block_flex.build_block_mask(
        as_pattern(PATTERNS["global_local"], 64), 64, 300, 1, 1, True, torch.device("cpu")
    )
    assert mask.kv_indices.device.type == "cpu" and mask.kv_indices.dtype == torch.int32
    for b in block_gather.buckets(as_pattern(PATTERNS["dilated"], 16), 16, 100, True):
        assert b.q_blocks.dtype == torch.int64 and b.used.dtype == torch.bool


# --- through the backend -------------------------------------------------------


class Attention(torch.nn.Module):
    def __init__(self, is_causal, gqa=False):
        super().__init__()
        self.is_causal, self.gqa = is_causal, gqa

    def forward(self, q, k, v):
        y = F.scaled_dot_product_attention(q, k, v, is_causal=self.is_causal, enable_gqa=self.gqa)
        return y * 2


def _policy(pattern, block_size=16):
    return {"version": 1, "rules": [{"match": "**", "attention": "block_sparse", "block_size": block_size, "pattern": pattern}]}


# through Inductor: a pattern of token-level masks and one with global rows, causal
_INDUCTOR_CASES = {("mask_mod", True), ("global_local", True)}


@pytest.mark.parametrize("kind,is_causal", [
    pytest.param(kind, causal, marks=[pytest.mark.inductor] if (kind, causal) in _INDUCTOR_CASES else [],
                 id=f"{kind}-{causal}")
    for causal in (False, True) for kind in PATTERNS])
def test_compiled_matches_eager_and_reference(kind, is_causal):
    torch._dynamo.reset()
    dilated_compile.clear_reports()
    q, k, v = _qkv(2, 3, 100, 8, torch.float32, requires_grad=True)
    model = torch.compile(Attention(is_causal), backend="dilated", options={"policy": _policy(PATTERNS[kind])})
    out = model(q, k, v)
    ref = 2 * block_sparse_reference(q, k, v, block_size=16, pattern=PATTERNS[kind], is_causal=is_causal)
    eager = 2 * block_sparse_attention(q, k, v, block_size=16, pattern=PATTERNS[kind], is_causal=is_causal)
    assert_within(out, ref, q, k, v, is_causal=is_causal)
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref_grads = torch.autograd.grad(ref, (q, k, v), dout.double())
    for name, g, r in zip("qkv", grads, ref_grads):
        assert_within(g, r, q, k, v, is_causal=is_causal, what=f"d{name}")
    (site,) = dilated_compile.reports()[-1].sites
    assert site.status == "rewritten" and site.attention.startswith("block_sparse b=16")


def test_compiled_gqa_site():
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 4, 64, 8, generator=g)
    k, v = (torch.randn(1, 2, 64, 8, generator=g) for _ in range(2))
    pattern = PATTERNS["global_local"]
    model = torch.compile(Attention(True, gqa=True), backend="dilated", options={"policy": _policy(pattern)})
    out = model(q, k, v)
    ref = 2 * block_sparse_reference(
        q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), block_size=16, pattern=pattern, is_causal=True
    )
    assert_within(out, ref, q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=True)


def test_report_says_density():
    torch._dynamo.reset()
    report = dilated_compile.explain(
        Attention(False), *_qkv(1, 2, 128, 8, torch.float32), policy=_policy({"kind": "local_window", "window": 1})
    )
    (site,) = report.sites
    # 8 blocks, window 1: 8 + 2*7 = 22 of 64 pairs
    assert site.attention == "block_sparse b=16 local_window(window=1), 34.4% of blocks"
    assert "block_sparse_attention" in report.diff


@pytest.mark.inductor
def test_threads_share_one_compiled_model_and_bounded_caches():
    torch._dynamo.reset()
    block_gather.buckets.cache_clear()
    model = torch.compile(Attention(True), backend="dilated", options={"policy": _policy(PATTERNS["dilated"])})
    inputs = [_qkv(1, 2, 96, 8, torch.float32, seed=s) for s in range(8)]
    expected = [model(*x) for x in inputs]
    results: list = [None] * 8
    errors: list = []

    def call(i):
        try:
            for _ in range(5):
                results[i] = model(*inputs[i])
        except Exception as exc:  # noqa: BLE001 - surfaced by the assert below
            errors.append(exc)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors and not any(t.is_alive() for t in threads)
    for got, want in zip(results, expected):
        assert torch.equal(got, want)
    # eager calls from threads at many lengths: the layout cache stays bounded
    pattern = as_pattern(PATTERNS["local_window"], 16)

    def eager(i):
        for n in range(20 + 10 * i, 30 + 10 * i):
            x = _qkv(1, 1, n, 4, torch.float64, seed=n)
            torch.testing.assert_close(
                block_sparse_attention(*x, block_size=16, pattern=pattern),
                block_sparse_reference(*x, block_size=16, pattern=pattern),
            )

    threads = [threading.Thread(target=eager, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    info = block_gather.buckets.cache_info()
    assert info.currsize <= info.maxsize == 32 and info.misses >= 80


def test_reference_counts_follow_the_spec_formulas():
    counts = block_sparse_counts(1, 1, 64, 16, {"kind": "global_local", "global_blocks": 1, "window": 0}, False)[0, 0]
    blocks = counts[::16, ::16]
    assert blocks.tolist() == [[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 0, 1]]
    causal = block_sparse_counts(1, 1, 64, 16, {"kind": "local_window", "window": 3}, True)[0, 0]
    assert torch.equal(causal, torch.ones(64, 64, dtype=torch.long).tril())


def test_exported_at_package_level():
    """docs/spec.md, "API": `dilated_compile.block_sparse_attention` (and its reference) without compiling."""
    q, k, v = (torch.randn(1, 2, 70, 8, dtype=torch.float64) for _ in range(3))
    pattern = {"kind": "local_window", "window": 1}
    out = dilated_compile.block_sparse_attention(q, k, v, block_size=16, pattern=pattern, is_causal=True)
    ref = dilated_compile.block_sparse_reference(q, k, v, block_size=16, pattern=pattern, is_causal=True)
    assert torch.allclose(out, ref, atol=1e-12)
    assert {"block_sparse_attention", "block_sparse_reference"} <= set(dilated_compile.__all__)
