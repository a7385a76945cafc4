"""Symbolic cost model of dense and dilated attention (forward pass).

Every cost is a sympy expression in the sequence length ``N``; all other sizes
(batch, heads, head_dim, segment lengths, dilation rates) are plain numbers.
The expressions are exact for every integer ``N >= 1``: a segment length
``w >= N`` needs no special case, because ``floor(N / w)`` is then 0 and the
single (short) segment is the remainder ``Mod(N, w) = N``.

Conventions
-----------
FLOPs
    ``4 * head_dim * pairs * batch``: two matmuls (``Q K^T`` and ``P V``), two
    FLOPs per multiply-add, where ``pairs`` is the number of (query, key)
    pairs scored, summed over heads. Softmax, scaling, gathers and the
    LongNet merge are not counted.
Pairs
    Dense: ``N**2`` per head, or ``N*(N+1)/2`` with causal. Dilated
    (docs/spec.md, "Dilated attention"): for each head and each pattern ``(w, r)`` it uses with
    offset ``o``, positions ``0..N-1`` are cut into segments of ``w`` (the last
    one whatever is left); a segment of length ``L`` selects
    ``m(L) = max(0, ceiling((L - o) / r))`` positions and contributes ``m**2``
    pairs (``m*(m+1)/2`` with causal). A key given to a query by two patterns
    counts twice, as it does in ``reference.dilated_counts``.
Memory
    A *lower bound* of bytes moved through device memory, not a prediction of
    what a given kernel moves: q, k and v read once and the output written
    once, ``dtype_bytes * batch * heads * N * head_dim * 4``. For
    ``head_split="longnet"`` add the per-pattern partial outputs, which the
    implementation keeps in float32, written once and read once by the merge:
    ``4 * 2 * batch * head_dim * (selected positions)`` summed over heads and
    patterns. Not counted: the log-sum-exp vectors, the gathers/spreads that
    make the selected rows contiguous, intermediate scores (a fused kernel
    keeps them on chip), and any re-reads a kernel makes of K/V.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Sequence

import sympy

from .policy.specs import HEAD_SPLITS

__all__ = ["Cost", "N", "dense_cost", "dilated_cost", "attended_pairs", "predicted_ratio"]

N = sympy.Symbol("N", positive=True, integer=True)

FLOAT32_BYTES = 4


@dataclass(frozen=True)
class Cost:
    """FLOPs and a lower bound of bytes moved, as expressions in ``N``."""

    flops: sympy.Expr
    memory: sympy.Expr

    def at(self, n: int) -> tuple[int, int]:
        """(flops, bytes) at ``N = n``, as exact ints."""
        return _int_at(self.flops, n), _int_at(self.memory, n)


def _int_at(expr: sympy.Expr, n: int) -> int:
    if int(n) != n or n < 1:
        raise ValueError(f"N={n!r}: expected an integer >= 1")
    value = sympy.sympify(expr).subs(N, sympy.Integer(int(n)))
    if not value.is_Integer:
        raise ValueError(f"cost {expr} is not an integer at N={n}: {value}")
    return int(value)


def _check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or int(value) != value or value < 1:
        raise ValueError(f"{name}={value!r}: expected a positive integer")
    return int(value)


def _check_patterns(segment_lengths, dilation_rates) -> tuple[tuple[int, ...], tuple[int, ...]]:
    ws = tuple(_check_positive_int("segment length", w) for w in segment_lengths)
    rs = tuple(_check_positive_int("dilation rate", r) for r in dilation_rates)
    if not ws or len(ws) != len(rs):
        raise ValueError(
            f"segment_lengths={list(ws)} and dilation_rates={list(rs)}: "
            "expected the same number (>= 1) of each"
        )
    return ws, rs


def _uses(
    heads: int, ws: Sequence[int], rs: Sequence[int], head_split: str
) -> Counter[tuple[int, int, int]]:
    """How many heads use each (w, r, offset): heads sharing one are grouped."""
    k = len(ws)
    uses: Counter[tuple[int, int, int]] = Counter()
    if head_split == "groups":
        for i in range(k):
            size = heads // k + (1 if i < heads % k else 0)
            if size:
                uses[(ws[i], rs[i], i % rs[i])] += size
    elif head_split == "longnet":
        for w, r in zip(ws, rs):
            for o in range(r):
                # heads h in [0, heads) with h % r == o
                count = heads // r + (1 if o < heads % r else 0)
                if count:
                    uses[(w, r, o)] += count
    else:
        raise ValueError(f"head_split={head_split!r}: expected 'groups' or 'longnet'")
    return uses


def _selected(length: sympy.Expr | int, r: int, o: int) -> sympy.Expr:
    """m(L): positions o, o+r, ... below L (0 when L <= o)."""
    return sympy.Max(0, sympy.ceiling(sympy.Rational(1, r) * (length - o)))


def _per_segment_pairs(m: sympy.Expr, is_causal: bool) -> sympy.Expr:
    return m * (m + 1) / 2 if is_causal else m**2


def _pattern_terms(w: int, r: int, o: int) -> tuple[sympy.Expr, int, sympy.Expr]:
    """(full segments, m of a full segment, m of the remainder segment)."""
    full = sympy.floor(N / w)
    m_full = max(0, -(-(w - o) // r))
    m_rest = _selected(sympy.Mod(N, w), r, o)  # Mod(N, w) = 0 gives m = 0 since o < r
    return full, m_full, m_rest


def _pattern_pairs(w: int, r: int, o: int, is_causal: bool) -> sympy.Expr:
    """(query, key) pairs of one pattern for one head, exact for all N >= 1."""
    full, m_full, m_rest = _pattern_terms(w, r, o)
    return full * _per_segment_pairs(sympy.Integer(m_full), is_causal) + _per_segment_pairs(
        m_rest, is_causal
    )


def _pattern_positions(w: int, r: int, o: int) -> sympy.Expr:
    """Positions one pattern selects for one head, exact for all N >= 1."""
    full, m_full, m_rest = _pattern_terms(w, r, o)
    return full * m_full + m_rest


def attended_pairs(
    heads: int,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    *,
    head_split: str,
    is_causal: bool,
) -> sympy.Expr:
    """(query, key) pairs of dilated attention summed over heads, as an expression in N.

    A key given to a query by two patterns counts twice. Equals
    ``reference.dilated_counts(heads, n, ...).sum()`` at every ``N = n >= 1``.
    """
    heads = _check_positive_int("heads", heads)
    ws, rs = _check_patterns(segment_lengths, dilation_rates)
    uses = _uses(heads, ws, rs, head_split)
    return sympy.Add(
        *(count * _pattern_pairs(w, r, o, is_causal) for (w, r, o), count in sorted(uses.items()))
    )


def _dense_pairs(is_causal: bool) -> sympy.Expr:
    return N * (N + 1) / 2 if is_causal else N**2


def _io_bytes(batch: int, heads: int, head_dim: int, dtype_bytes: int) -> sympy.Expr:
    """q, k, v read once and out written once."""
    return dtype_bytes * batch * heads * head_dim * 4 * N


def _check_sizes(batch: int, heads: int, head_dim: int, dtype_bytes: int) -> tuple[int, ...]:
    names = ("batch", "heads", "head_dim", "dtype_bytes")
    return tuple(_check_positive_int(n, v) for n, v in zip(names, (batch, heads, head_dim, dtype_bytes)))


def dense_cost(
    batch: int, heads: int, head_dim: int, *, is_causal: bool, dtype_bytes: int
) -> Cost:
    """Ordinary attention: ``4 * D * B * H * N**2`` FLOPs (half plus the diagonal when causal)."""
    batch, heads, head_dim, dtype_bytes = _check_sizes(batch, heads, head_dim, dtype_bytes)
    flops = 4 * head_dim * batch * heads * _dense_pairs(is_causal)
    return Cost(flops=sympy.expand(flops), memory=_io_bytes(batch, heads, head_dim, dtype_bytes))


def dilated_cost(
    batch: int,
    heads: int,
    head_dim: int,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    *,
    head_split: str,
    is_causal: bool,
    dtype_bytes: int,
) -> Cost:
    """Dilated attention (docs/spec.md, "Dilated attention"); see the module docstring for the conventions.

    Memory is a lower bound: the dense input/output traffic, plus for
    ``longnet`` the float32 per-pattern partial outputs written and read once
    by the merge (``8 * batch * head_dim`` bytes per selected position, summed
    over heads and patterns).
    """
    batch, heads, head_dim, dtype_bytes = _check_sizes(batch, heads, head_dim, dtype_bytes)
    ws, rs = _check_patterns(segment_lengths, dilation_rates)
    uses = _uses(heads, ws, rs, head_split)
    pairs = attended_pairs(heads, ws, rs, head_split=head_split, is_causal=is_causal)
    flops = 4 * head_dim * batch * pairs
    memory = _io_bytes(batch, heads, head_dim, dtype_bytes)
    if head_split == "longnet":
        positions = sympy.Add(
            *(count * _pattern_positions(w, r, o) for (w, r, o), count in sorted(uses.items()))
        )
        memory = memory + FLOAT32_BYTES * 2 * batch * head_dim * positions
    return Cost(flops=flops, memory=memory)


def predicted_ratio(original: Cost, rewritten: Cost, n: int) -> float:
    """FLOPs of ``rewritten`` over FLOPs of ``original`` at ``N = n``."""
    before = _int_at(original.flops, n)
    after = _int_at(rewritten.flops, n)
    if before == 0:
        raise ZeroDivisionError(f"original cost has 0 FLOPs at N={n}")
    return after / before


_DTYPE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}


def site_costs(site) -> tuple[Cost, Cost] | None:
    """(original, rewritten) costs of a site report whose shape is known, else None.

    The rewritten cost equals the original for sites that were not rewritten
    into dilated attention.
    """
    if site.shape is None or len(site.shape) != 4 or not all(isinstance(x, int) for x in site.shape):
        return None
    b, h, _, d = site.shape
    nbytes = _DTYPE_BYTES.get(site.dtype or "", 2)
    causal = bool(site.is_causal)
    original = dense_cost(b, h, d, is_causal=causal, dtype_bytes=nbytes)
    if site.dilated is None:
        return original, original
    seg, rates, head_split = site.dilated
    rewritten = dilated_cost(b, h, d, seg, rates, head_split=head_split, is_causal=causal, dtype_bytes=nbytes)
    return original, rewritten


def format_costs(sites) -> str:
    """A table: per site, FLOPs as expressions in N, their values at the site's N, the ratio."""
    rows = [("module", "N", "original FLOPs", "rewritten FLOPs", "at N: original", "rewritten", "ratio")]
    for site in sites:
        costs = site_costs(site)
        if costs is None:
            continue
        n = site.shape[2]
        original, rewritten = costs
        (fo, _), (fr, _) = original.at(n), rewritten.at(n)
        text = str(rewritten.flops)
        rows.append((site.module or "<root>", str(n), str(original.flops),
                     text if len(text) <= 60 else text[:57] + "...",
                     f"{fo:.3e}", f"{fr:.3e}", f"{fr / fo:.4f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)
