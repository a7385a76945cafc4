"""Tests of the symbolic cost model (dilated_compile/cost.py)."""

from __future__ import annotations

import pytest
import sympy

from dilated_compile.cost import (
    Cost,
    N,
    attended_pairs,
    dense_cost,
    dilated_cost,
    predicted_ratio,
)
from dilated_compile.lowering.reference import dilated_counts

SPLITS = ("groups", "longnet")
PATTERNS = [((8, 16, 32), (1, 2, 4)), ((16, 32, 64), (1, 6, 12)), ((4, 24), (1, 8))]
LENGTHS = (1, 5, 16, 45, 64, 100)

LONGNET_W = [2048, 4096, 8192, 16384, 32768]
LONGNET_R = [1, 2, 4, 8, 16]


def _brute_pairs(heads, n, segs, rates, head_split, is_causal) -> int:
    """Pair count by walking the definition position by position (no torch, no sympy)."""
    k = len(segs)
    if head_split == "groups":
        sizes = [heads // k + (1 if i < heads % k else 0) for i in range(k)]
        uses = [(size, segs[i], rates[i], i % rates[i]) for i, size in enumerate(sizes)]
    else:
        uses = [(1, w, r, h % r) for h in range(heads) for w, r in zip(segs, rates)]
    total = 0
    for count, w, r, o in uses:
        for start in range(0, n, w):
            m = sum(1 for p in range(start, min(start + w, n)) if (p - start) % r == o)
            total += count * (m * (m + 1) // 2 if is_causal else m * m)
    return total


@pytest.mark.parametrize("is_causal", [False, True])
def test_dense_cost_flops(is_causal):
    b, h, d = 3, 5, 64
    cost = dense_cost(b, h, d, is_causal=is_causal, dtype_bytes=2)
    expected = 2 * b * h * N * (N + 1) * d if is_causal else 4 * b * h * N**2 * d
    assert sympy.simplify(cost.flops - expected) == 0
    for n in (1, 7, 128, 4096):
        flops, mem = cost.at(n)
        assert isinstance(flops, int) and isinstance(mem, int)
        assert flops == (2 * b * h * n * (n + 1) * d if is_causal else 4 * b * h * n * n * d)
        assert mem == 2 * b * h * n * d * 4


def test_cost_is_frozen_and_symbolic():
    cost = dense_cost(1, 1, 8, is_causal=False, dtype_bytes=4)
    assert isinstance(cost, Cost)
    assert cost.flops.free_symbols == {N}
    with pytest.raises(Exception):
        cost.flops = sympy.Integer(0)  # type: ignore[misc]


@pytest.mark.parametrize("heads", [5, 2, 8])
@pytest.mark.parametrize("segs,rates", PATTERNS)
@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("head_split", SPLITS)
def test_attended_pairs_matches_reference(head_split, is_causal, segs, rates, heads):
    expr = attended_pairs(heads, segs, rates, head_split=head_split, is_causal=is_causal)
    assert expr.free_symbols <= {N}
    for n in LENGTHS:
        expected = int(dilated_counts(heads, n, segs, rates, head_split, is_causal).sum())
        got = expr.subs(N, n)
        assert got.is_Integer, (n, got)
        assert int(got) == expected, (n, int(got), expected)


@pytest.mark.parametrize("head_split", SPLITS)
@pytest.mark.parametrize("is_causal", [False, True])
def test_attended_pairs_exact_for_every_n(head_split, is_causal):
    """Every N from 1 past two periods of the largest segment, offsets >= w included."""
    cases = [((8, 16, 32), (1, 2, 4), 5), ((16, 32, 64), (1, 6, 12), 8), ((4, 3), (8, 5), 7)]
    for segs, rates, heads in cases:
        expr = attended_pairs(heads, segs, rates, head_split=head_split, is_causal=is_causal)
        for n in range(1, 2 * max(segs) + 3):
            got = expr.subs(N, n)
            assert got.is_Integer, (segs, n, got)
            assert int(got) == _brute_pairs(heads, n, segs, rates, head_split, is_causal), (segs, n)


def test_attended_pairs_single_full_pattern_is_dense():
    """One pattern with w >= N, r = 1 is ordinary attention (the identity in docs/spec.md, "Dilated attention")."""
    for is_causal in (False, True):
        expr = attended_pairs(3, (64,), (1,), head_split="groups", is_causal=is_causal)
        dense = dense_cost(1, 3, 1, is_causal=is_causal, dtype_bytes=1)
        for n in range(1, 65):
            assert 4 * expr.subs(N, n) == dense.at(n)[0]


@pytest.mark.parametrize("head_split", SPLITS)
def test_dilated_cost_flops_and_memory(head_split):
    b, h, d, dtype_bytes = 2, 5, 16, 2
    segs, rates = (8, 16, 32), (1, 2, 4)
    cost = dilated_cost(
        b, h, d, segs, rates, head_split=head_split, is_causal=True, dtype_bytes=dtype_bytes
    )
    for n in LENGTHS:
        counts = dilated_counts(h, n, segs, rates, head_split, True)
        flops, mem = cost.at(n)
        assert flops == 4 * d * b * int(counts.sum())
        base = dtype_bytes * b * h * n * d * 4
        if head_split == "groups":
            assert mem == base
        else:
            # a position is selected by a pattern iff its diagonal entry is 1
            selected = int(counts.diagonal(dim1=-2, dim2=-1).sum())
            assert mem == base + 4 * 2 * b * d * selected


def test_longnet_ratio_at_large_n():
    b, h, d, n = 1, 8, 64, 131072
    for is_causal in (False, True):
        dense = dense_cost(b, h, d, is_causal=is_causal, dtype_bytes=2)
        for head_split in SPLITS:
            dil = dilated_cost(
                b, h, d, LONGNET_W, LONGNET_R,
                head_split=head_split, is_causal=is_causal, dtype_bytes=2,
            )
            ratio = predicted_ratio(dense, dil, n)
            assert isinstance(ratio, float)
            assert 0 < ratio < 0.1, (head_split, is_causal, ratio)
            pairs = attended_pairs(
                h, LONGNET_W, LONGNET_R, head_split=head_split, is_causal=is_causal
            ).subs(N, n)
            dense_pairs = h * (n * (n + 1) // 2 if is_causal else n * n)
            assert ratio == pytest.approx(int(pairs) / dense_pairs, rel=1e-12)


def test_predicted_ratio_identity():
    dense = dense_cost(2, 4, 32, is_causal=False, dtype_bytes=2)
    same = dilated_cost(2, 4, 32, [1 << 20], [1], head_split="groups", is_causal=False, dtype_bytes=2)
    for n in (1, 100, 5000):
        assert predicted_ratio(dense, same, n) == 1.0


def test_bad_arguments():
    with pytest.raises(ValueError):
        attended_pairs(4, (8, 16), (1,), head_split="groups", is_causal=False)
    with pytest.raises(ValueError):
        attended_pairs(4, (8,), (1,), head_split="bogus", is_causal=False)
    with pytest.raises(ValueError):
        attended_pairs(4, (0,), (1,), head_split="groups", is_causal=False)
    with pytest.raises(ValueError):
        dense_cost(1, 1, 8, is_causal=False, dtype_bytes=2).at(0)


@pytest.mark.parametrize("head_split,rates", [("groups", (1, 2, 4, 8, 16)), ("longnet", (1, 2, 4, 6, 12))])
@pytest.mark.parametrize("n", [32768, 65536 + 4097, 131072])
def test_cost_model_matches_the_benchmarks_count_of_kernel_work(head_split, rates, n):
    """Two independent counts: the cost model's expression, and the pairs the
    lowering's plan gives its kernels (what benchmarks/bench_dilated.py reports)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_dilated.py"
    spec = importlib.util.spec_from_file_location("bench_dilated", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    seg = (2048, 4096, 8192, 16384, 32768)
    pairs = bench.attended_pairs(16, n, seg, rates, head_split, False)
    model = attended_pairs(16, seg, rates, head_split=head_split, is_causal=False)
    assert int(model.subs(N, n)) == pairs
