"""Block-sparse attention by gathering each query block's active key blocks.

The lowering for CPU (where compiled FlexAttention has no backward) and for
float64: plain tensor ops, so autograd and Inductor handle forward and
backward. Query blocks are grouped into buckets by how many key blocks they
use (next power of two), so a few dense "global" rows do not pad every other
row to the full sequence; each bucket is one batched masked softmax over its
gathered keys. Work and memory are proportional to the active blocks.
"""

from __future__ import annotations

from functools import lru_cache
from typing import NamedTuple

import torch

from ...policy.specs import BlockPattern
from .patterns import blocks_active, evaluate_mask_mod, in_window, token_mask_mod
from ..common.constants import graph_constant, outside_tracing
from ..common.block_kernels import accumulation_dtype


class Bucket(NamedTuple):
    q_blocks: torch.Tensor  # (m,) query block indices
    kv_blocks: torch.Tensor  # (m, K) key block indices (0 where unused)
    used: torch.Tensor  # (m, K) bool: entry is an active key block


def _active_blocks(pattern: BlockPattern, block_size: int, n: int, is_causal: bool) -> torch.Tensor:
    """(nb, nb) bool: key blocks with at least one allowed key for some query of
    the query block (any batch, any head)."""
    nb = -(-n // block_size)
    idx = torch.arange(nb)
    if pattern.kind != "mask_mod":
        active = blocks_active(pattern, idx[:, None], idx[None, :])
        if pattern.token_window is not None:  # the nearest positions of two blocks
            gap = ((idx[:, None] - idx[None, :]).abs() - 1).clamp(min=0) * block_size + (idx[:, None] != idx[None, :])
            active = active & (gap < pattern.token_window)
        return active & (idx[None, :] <= idx[:, None]) if is_causal else active
    pos = torch.arange(n)
    rows = []
    for start in range(0, n, 4096):
        q = pos[start : start + 4096]
        allowed = evaluate_mask_mod(token_mask_mod(pattern, block_size, is_causal), 1, 1, q, pos)[0, 0]
        allowed = torch.nn.functional.pad(allowed, (0, nb * block_size - n))
        rows.append(allowed.reshape(len(q), nb, block_size).any(dim=-1))
    per_query = torch.cat(rows)
    per_query = torch.nn.functional.pad(per_query, (0, 0, 0, nb * block_size - n))
    return per_query.reshape(nb, block_size, nb).any(dim=1)


@lru_cache(maxsize=32)
def buckets(pattern: BlockPattern, block_size: int, n: int, is_causal: bool) -> tuple[Bucket, ...]:
    """Query blocks grouped by the power of two at or above their key-block count."""
    active = _active_blocks(pattern, block_size, n, is_causal)
    counts = active.sum(dim=1)
    # Width at least 2: Inductor (CPU, torch 2.13) computed wrong key gradients
    # for a bucket of width 1 (seen with causal local windows).
    width = torch.where(counts > 0, 2 ** torch.ceil(torch.log2(counts.clamp(min=2).double())), 0).long()
    out = []
    for w in sorted(set(width.tolist())):
        rows = torch.nonzero(width == w).flatten()
        if w == 0:  # query blocks with no key at all: every entry unused, output 0
            unused = torch.zeros(len(rows), 2, dtype=torch.bool)
            out.append(Bucket(rows, torch.zeros(len(rows), 2, dtype=torch.long), unused))
            continue
        sub = torch.nn.functional.pad(active[rows], (0, max(0, w - active.shape[1])))
        order = torch.argsort(sub.to(torch.int8), dim=1, descending=True, stable=True)[:, :w]
        used = torch.gather(sub, 1, order)
        out.append(Bucket(rows, torch.where(used, order, 0), used))
    return tuple(out)


def _blocks(x: torch.Tensor, index: torch.Tensor, block_size: int) -> torch.Tensor:
    """(B, H, *index.shape, b, D): the blocks of x (B, H, nb*b, D) at block indices `index`."""
    bsz, heads, _, dim = x.shape
    picked = torch.index_select(x.view(bsz, heads, -1, block_size, dim), 2, index.flatten())
    return picked.view(bsz, heads, *index.shape, block_size, dim)


def _allowed(bucket: Bucket, pattern, block_size, n, is_causal, bsz, heads, device) -> torch.Tensor:
    """(m | B, H, m, b, K*b) bool: which gathered keys each query of the bucket may use."""
    m, width = bucket.kv_blocks.shape
    offsets = torch.arange(block_size, device=device)
    q_pos = bucket.q_blocks[:, None] * block_size + offsets  # (m, b)
    k_pos = (bucket.kv_blocks[:, :, None] * block_size + offsets).reshape(m, -1)  # (m, K*b)
    allowed = (bucket.used[:, :, None].expand(m, width, block_size).reshape(m, 1, -1)) & (k_pos < n)[:, None, :]
    if is_causal:
        allowed = allowed & (k_pos[:, None, :] <= q_pos[:, :, None])
    if pattern.token_window is not None:
        allowed = allowed & in_window(pattern.token_window, q_pos[:, :, None], k_pos[:, None, :])
    if pattern.kind == "mask_mod":
        user = token_mask_mod(pattern, block_size, False)
        per_row = torch.vmap(lambda qi, ki: evaluate_mask_mod(user, bsz, heads, qi, ki), out_dims=2)
        allowed = allowed & per_row(q_pos.clamp(max=n - 1), k_pos.clamp(max=n - 1))
    return allowed


def _bucket_scores(q, k, bucket: Bucket, pattern, block_size, n, is_causal, scale):
    """(qg, kg, masked scaled scores) of one bucket, in the accumulation dtype."""
    bsz, heads, _, dim = q.shape
    m, width = bucket.kv_blocks.shape
    acc = accumulation_dtype(q)
    qg = _blocks(q, bucket.q_blocks, block_size).to(acc)
    kg = _blocks(k, bucket.kv_blocks, block_size).reshape(bsz, heads, m, width * block_size, dim).to(acc)
    allowed = _allowed(bucket, pattern, block_size, n, is_causal, bsz, heads, q.device)
    scores = torch.matmul(qg, kg.transpose(-2, -1)) * scale
    return qg, kg, scores.masked_fill(~allowed, float("-inf"))


def _bucket_attention(q, k, v, bucket: Bucket, pattern, block_size, n, is_causal, scale):
    """(B, H, m*b, D) output of one bucket's query blocks in the accumulation dtype,
    and their (B, H, m*b) log-sum-exp (-inf for a query with no key)."""
    bsz, heads, _, dim = q.shape
    m, width = bucket.kv_blocks.shape
    acc = accumulation_dtype(q)
    vg = _blocks(v, bucket.kv_blocks, block_size).reshape(bsz, heads, m, width * block_size, dim)
    _, _, scores = _bucket_scores(q, k, bucket, pattern, block_size, n, is_causal, scale)
    top = scores.amax(dim=-1, keepdim=True).detach()
    top = torch.where(torch.isinf(top), torch.zeros_like(top), top)
    weights = torch.exp(scores - top)
    total = weights.sum(dim=-1, keepdim=True)
    out = torch.matmul(weights, vg.to(acc)) / torch.where(total > 0, total, torch.ones_like(total))
    lse = (top + torch.log(total)).reshape(bsz, heads, m * block_size)
    return out.reshape(bsz, heads, m * block_size, dim), lse


def _layout(q, pattern, block_size, n, is_causal) -> list[Bucket]:
    with outside_tracing():
        layout = buckets(pattern, block_size, n, is_causal)
    return [Bucket(*(graph_constant(t).to(q.device) for t in b)) for b in layout]


def _inverse(layout: list[Bucket]) -> torch.Tensor:
    """Where each query block's rows are in the buckets' concatenated output."""
    order = torch.cat([b.q_blocks for b in layout])
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(len(order), device=order.device)
    return inverse


def gather_block_sparse_with_lse(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: BlockPattern,
    block_size: int,
    is_causal: bool,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-sparse attention of (B, H, N, D) tensors by gathered key blocks, and its
    (B, H, N) log-sum-exp in the accumulation dtype (-inf for a query with no key)."""
    n = q.shape[2]
    layout = _layout(q, pattern, block_size, n, is_causal)
    pad = (-n) % block_size
    q, k, v = (torch.nn.functional.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
    parts = [_bucket_attention(q, k, v, b, pattern, block_size, n, is_causal, scale) for b in layout]
    inverse = _inverse(layout)
    nb = len(inverse)
    out = torch.cat([o for o, _ in parts], dim=2).view(*q.shape[:2], nb, block_size, q.shape[-1])[:, :, inverse]
    lse = torch.cat([s for _, s in parts], dim=2).view(*q.shape[:2], nb, block_size)[:, :, inverse]
    return out.reshape(q.shape)[:, :, :n].to(q.dtype), lse.reshape(q.shape[:3])[:, :, :n]


def gather_block_sparse(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: BlockPattern,
    block_size: int,
    is_causal: bool,
    scale: float,
) -> torch.Tensor:
    """Block-sparse attention of (B, H, N, D) tensors by gathered key blocks."""
    return gather_block_sparse_with_lse(q, k, v, pattern, block_size, is_causal, scale)[0]


def gather_block_sparse_backward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    dout: torch.Tensor,
    pattern: BlockPattern,
    block_size: int,
    is_causal: bool,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of `gather_block_sparse_with_lse` from its out and lse: per bucket,
    the probabilities exp(scores - lse) and the usual softmax backward, key-block
    gradients added back at the blocks they were gathered from."""
    n = q.shape[2]
    bsz, heads, _, dim = q.shape
    acc = accumulation_dtype(q)
    layout = _layout(q, pattern, block_size, n, is_causal)
    pad = (-n) % block_size
    nb = (n + pad) // block_size
    q, k, v, out, dout = (torch.nn.functional.pad(x, (0, 0, 0, pad)) for x in (q, k, v, out, dout))
    lse = torch.nn.functional.pad(torch.where(torch.isinf(lse), 0.0, lse).to(acc), (0, pad))
    delta = (dout.to(acc) * out.to(acc)).sum(dim=-1)  # (B, H, N): rowsum(dO * O)
    dq = q.new_zeros(bsz, heads, nb, block_size, dim, dtype=acc)
    dk = torch.zeros_like(dq)
    dv = torch.zeros_like(dq)
    lse_blocks, delta_blocks = (x.view(bsz, heads, nb, block_size) for x in (lse, delta))
    for bucket in layout:
        m, width = bucket.kv_blocks.shape
        qg, kg, scores = _bucket_scores(q, k, bucket, pattern, block_size, n, is_causal, scale)
        vg = _blocks(v, bucket.kv_blocks, block_size).reshape(bsz, heads, m, width * block_size, dim).to(acc)
        dog = _blocks(dout, bucket.q_blocks, block_size).to(acc)
        rows_lse = torch.index_select(lse_blocks, 2, bucket.q_blocks)[..., None]
        rows_delta = torch.index_select(delta_blocks, 2, bucket.q_blocks)[..., None]
        p = torch.exp(scores - rows_lse)  # 0 where masked
        ds = p * (torch.matmul(dog, vg.transpose(-2, -1)) - rows_delta) * scale
        dq.index_copy_(2, bucket.q_blocks, torch.matmul(ds, kg))
        key_blocks = bucket.kv_blocks.flatten()
        dk.index_add_(2, key_blocks, torch.matmul(ds.transpose(-2, -1), qg).view(bsz, heads, -1, block_size, dim))
        dv.index_add_(2, key_blocks, torch.matmul(p.transpose(-2, -1), dog).view(bsz, heads, -1, block_size, dim))
    return tuple(
        g.view(bsz, heads, nb * block_size, dim)[:, :, :n].to(x.dtype) for g, x in zip((dq, dk, dv), (q, k, v))
    )
