"""Block-sparse attention on GPU: FlexAttention with a BlockMask.

FlexAttention decides sparsity per TILE x TILE tile (128 tokens): a tile is
skipped, run without a mask (full) or run with the token-level mask_mod
(partial). For the built-in patterns the class of every tile follows in
closed form from the range of block distances it covers, so the BlockMask is
a few small tensor ops in O((N/128)^2), built inside the compiled graph. A
user mask_mod is evaluated once per shape (in chunks of query tiles) and its
tile classes become constants of the graph.

Exactness never depends on the classification being tight: every tile that
is not certainly full runs the token-level mask_mod.
"""

from __future__ import annotations

from functools import lru_cache

import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from ...policy.specs import BlockPattern
from .patterns import evaluate_mask_mod, load_mask_mod, token_mask_mod
from ..common.constants import aot_tracing, graph_constant, outside_tracing

TILE = 128  # FlexAttention's default sparse block size


def _floor_div(a: torch.Tensor, b: int) -> torch.Tensor:
    return torch.div(a, b, rounding_mode="floor")


def _has_multiple(lo: torch.Tensor, hi: torch.Tensor, s: int) -> torch.Tensor:
    """Whether the integer range [lo, hi] contains a multiple of s."""
    return _floor_div(hi, s) * s >= lo


def _only_multiples(lo: torch.Tensor, hi: torch.Tensor, s: int) -> torch.Tensor:
    """Whether every integer in [lo, hi] (possibly empty) is a multiple of s."""
    if s == 1:
        return torch.ones_like(lo, dtype=torch.bool)
    return (lo > hi) | ((lo == hi) & (torch.remainder(lo, s) == 0))


def _local_any_all(qlo, qhi, klo, khi, w):
    dmin, dmax = qlo - khi, qhi - klo
    return (dmin <= w) & (dmax >= -w), (dmin >= -w) & (dmax <= w)


def tile_classes(
    pattern: BlockPattern,
    block_size: int,
    n: int,
    is_causal: bool,
    device: torch.device,
    q_offset: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(any, full): bool per TILE x TILE tile of a built-in pattern: whether some
    token pair in it is allowed, whether all are. Query tiles cover positions
    q_offset.. n-1 (queries before q_offset are computed elsewhere), key tiles 0.. n-1."""
    q_start = q_offset + TILE * torch.arange(-(-(n - q_offset) // TILE), device=device)
    k_start = TILE * torch.arange(-(-n // TILE), device=device)
    q_end = torch.clamp(q_start + TILE, max=n) - 1  # last position in the tile
    k_end = torch.clamp(k_start + TILE, max=n) - 1
    qlo, qhi = (q_start // block_size)[:, None], (q_end // block_size)[:, None]
    klo, khi = (k_start // block_size)[None, :], (k_end // block_size)[None, :]
    w = pattern.window
    any_, all_ = _local_any_all(qlo, qhi, klo, khi, w)
    if pattern.kind == "dilated":
        s = pattern.stride
        dmin, dmax = qlo - khi, qhi - klo
        any_ = any_ | _has_multiple(dmin, dmax, s) | _has_multiple(-dmax, -dmin, s)
        above = _only_multiples(torch.clamp(dmin, min=w + 1), dmax, s)
        below = _only_multiples(dmin, torch.clamp(dmax, max=-w - 1), s)
        all_ = above & below
    elif pattern.kind == "global_local":
        g = pattern.global_blocks
        any_ = any_ | (qlo < g) | (klo < g)
        _, rest_local = _local_any_all(torch.clamp(qlo, min=g), qhi, torch.clamp(klo, min=g), khi, w)
        all_ = (qhi < g) | (khi < g) | rest_local
    if is_causal:  # per token on global positions
        any_ = any_ & (k_start[None, :] <= q_end[:, None])
        all_ = all_ & (k_end[None, :] <= q_start[:, None])
    if pattern.token_window is not None:  # |i - j| < window, per token
        nearest = torch.clamp(torch.maximum(k_start[None, :] - q_end[:, None], q_start[:, None] - k_end[None, :]), min=0)
        farthest = torch.maximum(k_end[None, :] - q_start[:, None], q_end[:, None] - k_start[None, :])
        any_ = any_ & (nearest < pattern.token_window)
        all_ = all_ & (farthest < pattern.token_window)
    return any_, all_ & any_


def _mask_mod_tile_classes(
    pattern: BlockPattern, n: int, batch: int, heads: int, is_causal: bool, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(any, full): (batch, heads, nt, nt) bool for a user mask_mod, evaluated
    on every token pair, 8 * TILE query rows at a time. Pairs past the end of
    the sequence count as neither allowed nor disallowed."""
    mask_mod = token_mask_mod(pattern, 1, is_causal)
    nt = -(-n // TILE)
    kv = torch.arange(nt * TILE, device=device)
    any_rows, all_rows = [], []
    for start in range(0, nt * TILE, 8 * TILE):
        q = torch.arange(start, min(start + 8 * TILE, nt * TILE), device=device)
        allowed = evaluate_mask_mod(
            mask_mod, batch, heads, q.clamp(max=n - 1), kv.clamp(max=n - 1)
        )
        inside = (q < n)[:, None] & (kv < n)[None, :]
        shape = (batch, heads, -1, TILE, nt, TILE)
        any_rows.append((allowed & inside).reshape(shape).any(dim=5).any(dim=3))
        all_rows.append((allowed | ~inside).reshape(shape).all(dim=5).all(dim=3))
    return torch.cat(any_rows, dim=2), torch.cat(all_rows, dim=2)


def _ordered(selected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(count, indices) in BlockMask form: the selected columns first, per row."""
    count = selected.sum(dim=-1, dtype=torch.int32)
    indices = torch.argsort(selected.to(torch.int8), dim=-1, descending=True, stable=True)
    return count, indices.to(torch.int32)


def _block_mask(any_: torch.Tensor, full: torch.Tensor, mask_mod, n_q: int, n: int) -> BlockMask:
    while any_.dim() < 4:
        any_, full = any_[None], full[None]
    kv_num, kv_idx = _ordered(any_ & ~full)
    full_num, full_idx = _ordered(full)
    return BlockMask.from_kv_blocks(
        kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=TILE, mask_mod=mask_mod, seq_lengths=(n_q, n)
    )


def _shift_queries(mask_mod, q_offset: int):
    """`mask_mod` for queries numbered from 0 that sit at positions q_offset.. ."""
    if q_offset == 0:
        return mask_mod

    def shifted(b, h, q_idx, kv_idx):
        return mask_mod(b, h, q_idx + q_offset, kv_idx)

    return shifted


def build_block_mask(
    pattern: BlockPattern,
    block_size: int,
    n: int,
    batch: int,
    heads: int,
    is_causal: bool,
    device: torch.device,
    q_offset: int = 0,
) -> BlockMask:
    """The BlockMask of the pattern for sequence length n, for the queries at
    q_offset.. n-1 (uncached; traceable)."""
    mask_mod = _shift_queries(token_mask_mod(pattern, block_size, is_causal), q_offset)
    if pattern.kind == "mask_mod":
        if q_offset:
            raise ValueError("a mask_mod pattern's block mask covers every query (q_offset=0)")
        with outside_tracing():
            any_, full = _mask_mod_tile_classes(pattern, n, batch, heads, is_causal, device)
        any_, full = graph_constant(any_), graph_constant(full)
    else:
        any_, full = tile_classes(pattern, block_size, n, is_causal, device, q_offset)
    return _block_mask(any_, full, mask_mod, n - q_offset, n)


@lru_cache(maxsize=32)
def cached_block_mask(
    pattern: BlockPattern,
    block_size: int,
    n: int,
    batch: int,
    heads: int,
    is_causal: bool,
    device: torch.device,
    q_offset: int = 0,
) -> BlockMask:
    """`build_block_mask`, kept for eager calls: keyed by everything that
    determines the mask, at most 32 entries."""
    return build_block_mask(pattern, block_size, n, batch, heads, is_causal, device, q_offset)


@lru_cache(maxsize=1)
def _compiled_flex():
    return torch.compile(flex_attention, dynamic=False)


def _flex(q, k, v, scale, **kwargs):
    """flex_attention: traced into the graph under compile, compiled once eagerly."""
    if torch.compiler.is_dynamo_compiling() or aot_tracing():
        return flex_attention(q, k, v, scale=scale, **kwargs)
    return _compiled_flex()(q, k, v, scale=scale, **kwargs)


def _sparse(q, k, v, pattern, block_size, is_causal, scale, q_offset=0, return_lse=False):
    """Flex with the pattern's BlockMask, for the queries at q_offset.. (and the lse)."""
    b, h, n = q.shape[0], q.shape[1], k.shape[2]
    mask_b = b if pattern.kind == "mask_mod" else 1
    mask_h = h if pattern.kind == "mask_mod" else 1
    tracing = torch.compiler.is_dynamo_compiling() or aot_tracing()
    build = build_block_mask if tracing else cached_block_mask
    block_mask = build(pattern, block_size, n, mask_b, mask_h, is_causal, q.device, q_offset)
    if return_lse:
        return _flex(q, k, v, scale, block_mask=block_mask, return_lse=True)
    return _flex(q, k, v, scale, block_mask=block_mask)


def _keys_per_row(pattern: BlockPattern, block_size: int) -> int:
    """Keys a non-global query of a global_local pattern attends to, at most."""
    return (2 * pattern.window + 1 + pattern.global_blocks) * block_size


def _all_keys_split(q, k, v, scale, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q over every key, the keys cut into chunks that run in
    parallel (as extra batch entries) and merge by log-sum-exp; and its lse."""
    b, h, m, d = q.shape
    n = k.shape[2]
    pieces = -(-n // chunk)
    pad = pieces * chunk - n

    def as_batch(x):  # (b, h, n, d) -> (b * pieces, h, chunk, d)
        x = torch.nn.functional.pad(x, (0, 0, 0, pad))
        return x.view(b, h, pieces, chunk, d).transpose(1, 2).reshape(b * pieces, h, chunk, d)

    qs = q.unsqueeze(1).expand(b, pieces, h, m, d).reshape(b * pieces, h, m, d)

    def in_sequence(score, bi, hi, q_idx, kv_idx):
        return torch.where((bi % pieces) * chunk + kv_idx < n, score, -float("inf"))

    out, lse = _flex(qs, as_batch(k), as_batch(v), scale, score_mod=in_sequence, return_lse=True)
    out = out.view(b, pieces, h, m, d).float()
    lse = lse.view(b, pieces, h, m).float()
    top = lse.amax(dim=1, keepdim=True).detach()
    weights = torch.exp(lse - top)
    total = weights.sum(dim=1)
    merged = (weights.unsqueeze(-1) * out).sum(dim=1) / total.unsqueeze(-1)
    return merged.to(q.dtype), top.squeeze(1) + torch.log(total)


def flex_block_sparse(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: BlockPattern,
    block_size: int,
    is_causal: bool,
    scale: float,
    return_lse: bool = False,
):
    """Block-sparse attention through FlexAttention (CUDA); with `return_lse`,
    (out, lse) with the (B, H, N) float32 log-sum-exp of each query.

    The global query rows of a non-causal global_local pattern attend to every
    key; in one flex call each of their tiles would walk all key tiles in one
    program while the other rows finish early. They run instead as a
    split-key dense attention, the rest as a block-sparse call from there on.
    """
    n = q.shape[2]
    if pattern.kind == "global_local" and not is_causal and pattern.token_window is None:
        rows = min(n, pattern.global_blocks * block_size)
        per_row = _keys_per_row(pattern, block_size)
        if 4 * per_row < n and rows < n:
            chunk = TILE * max(4, -(-per_row // TILE))
            head, head_lse = _all_keys_split(q[:, :, :rows], k, v, scale, chunk)
            rest = _sparse(q[:, :, rows:], k, v, pattern, block_size, False, scale, rows, return_lse)
            if not return_lse:
                return torch.cat([head, rest], dim=2)
            return torch.cat([head, rest[0]], dim=2), torch.cat([head_lse, rest[1].float()], dim=2)
    return _sparse(q, k, v, pattern, block_size, is_causal, scale, return_lse=return_lse)
