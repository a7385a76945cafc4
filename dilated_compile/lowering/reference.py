"""Float64 reference implementations, written for clarity, not speed.

Each attention is one softmax per query over a *multiplicity matrix*
``count[h, i, j]``: how many times query i of head h is given key j. Dense
attention has count 1 everywhere (below the diagonal when causal); dilated
attention adds 1 for every pattern that selects both i and j in one segment.
A query with no key gets output 0. The tests compare every fast path with
these functions.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch


def attention_with_counts(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, count: torch.Tensor, scale: float | None
) -> torch.Tensor:
    """softmax over keys with each key weighted by its count, in float64.

    q, k, v: (B, H, N, D); count: (H, N, N) or (N, N), non-negative integers.
    """
    q, k, v = q.double(), k.double(), v.double()
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    scores = (q @ k.transpose(-2, -1)) * scale
    count = count.double().to(q.device)
    allowed = count > 0
    scores = scores.masked_fill(~allowed, float("-inf"))
    row_max = scores.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isinf(row_max), torch.zeros_like(row_max), row_max)
    weights = count * torch.exp(scores - row_max)
    total = weights.sum(dim=-1, keepdim=True)
    probs = torch.where(total > 0, weights / torch.where(total > 0, total, 1.0), 0.0)
    return probs @ v


def causal_counts(n: int) -> torch.Tensor:
    """(N, N) counts of causal dense attention."""
    return torch.ones(n, n, dtype=torch.int64).tril()


def window_counts(n: int, window: int | None, is_causal: bool) -> torch.Tensor:
    """(N, N) counts of dense attention with a sliding window: key j is given to query i
    when |i - j| < window (with causal: i - window < j <= i); every key when window is None."""
    count = causal_counts(n) if is_causal else torch.ones(n, n, dtype=torch.int64)
    if window is not None:
        pos = torch.arange(n)
        count = count * ((pos[:, None] - pos[None, :]).abs() < window)
    return count


def dense_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, is_causal: bool = False, scale=None,
    window: int | None = None,
) -> torch.Tensor:
    """Ordinary attention in float64; with `window`, restricted to a sliding window of that
    many positions (|i - j| < window, and j <= i when causal)."""
    return attention_with_counts(q, k, v, window_counts(q.shape[-2], window, is_causal), scale)


def pattern_counts(n: int, w: int, r: int, offset: int, is_causal: bool) -> torch.Tensor:
    """(N, N) 0/1 matrix: 1 where one pattern (w, r, offset) gives key j to query i."""
    pos = torch.arange(n)
    segment = pos // w
    selected = (pos - segment * w) % r == offset
    same_segment = segment[:, None] == segment[None, :]
    count = (same_segment & selected[:, None] & selected[None, :]).to(torch.int64)
    if is_causal:
        count = count * causal_counts(n)
    return count


def dilated_counts(
    num_heads: int,
    n: int,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    head_split: str,
    is_causal: bool,
) -> torch.Tensor:
    """(H, N, N) multiplicity matrix of dilated attention (docs/spec.md, "Dilated attention")."""
    k = len(segment_lengths)
    count = torch.zeros(num_heads, n, n, dtype=torch.int64)
    if head_split == "groups":
        sizes = [num_heads // k + (1 if i < num_heads % k else 0) for i in range(k)]
        start = 0
        for i, size in enumerate(sizes):
            r = dilation_rates[i]
            pattern = pattern_counts(n, segment_lengths[i], r, i % r, is_causal)
            count[start : start + size] += pattern
            start += size
    elif head_split == "longnet":
        for h in range(num_heads):
            for w, r in zip(segment_lengths, dilation_rates):
                count[h] += pattern_counts(n, w, r, h % r, is_causal)
    else:
        raise ValueError(f"head_split={head_split!r}: expected 'groups' or 'longnet'")
    return count


def dilated_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    *,
    head_split: str = "groups",
    is_causal: bool = False,
    scale: float | None = None,
) -> torch.Tensor:
    """Dilated attention in float64, straight from the definition."""
    count = dilated_counts(
        q.shape[1], q.shape[2], segment_lengths, dilation_rates, head_split, is_causal
    )
    return attention_with_counts(q, k, v, count, scale)


def block_sparse_counts(
    batch: int, num_heads: int, n: int, block_size: int, pattern, is_causal: bool
) -> torch.Tensor:
    """(B, H, N, N) 0/1 matrix of block-sparse attention (docs/spec.md, "Block-sparse attention").

    Key j is allowed for query i when the pattern allows the pair (key block
    j // b for query block i // b, or the mask_mod at token level), if causal
    j <= i on global positions, and with a token window |i - j| < window.
    """
    from .block_sparse.patterns import as_pattern, evaluate_mask_mod, load_mask_mod

    pattern = as_pattern(pattern, block_size)
    pos = torch.arange(n)
    if pattern.kind == "mask_mod":
        user = load_mask_mod(pattern.function)
        allowed = evaluate_mask_mod(user, batch, num_heads, pos, pos)
    else:
        nb = -(-n // block_size)
        blocks = torch.tensor(
            [[_block_allowed(pattern, qb, kb) for kb in range(nb)] for qb in range(nb)],
            dtype=torch.bool,
        ).reshape(nb, nb)
        allowed = blocks[pos // block_size][:, pos // block_size].expand(batch, num_heads, n, n)
    if is_causal:
        allowed = allowed & (pos[None, :] <= pos[:, None])
    if pattern.token_window is not None:
        allowed = allowed & ((pos[:, None] - pos[None, :]).abs() < pattern.token_window)
    return allowed.to(torch.int64)


def _block_allowed(pattern, qb: int, kb: int) -> bool:
    """docs/spec.md, "Block-sparse attention", one (query block, key block) pair at a time."""
    near = abs(qb - kb) <= pattern.window
    if pattern.kind == "local_window":
        return near
    if pattern.kind == "dilated":
        return near or (qb - kb) % pattern.stride == 0
    if pattern.kind == "global_local":
        return near or qb < pattern.global_blocks or kb < pattern.global_blocks
    raise ValueError(f"unknown block pattern kind {pattern.kind!r}")


def block_sparse_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    block_size: int,
    pattern,
    is_causal: bool = False,
    scale: float | None = None,
) -> torch.Tensor:
    """Block-sparse attention in float64, straight from the definition."""
    b, h, n, _ = q.shape
    count = block_sparse_counts(b, h, n, block_size, pattern, is_causal)
    return attention_with_counts(q, k, v, count, scale)
