"""Block-sparse ring attention by key exchange, forward and backward (docs/spec.md, "Block-sparse attention" and "Ring attention").

A built-in block pattern (local window, global + local, dilated blocks)
usually lets a rank's queries see a few blocks of another rank's shard, not
the shard: a local window needs only the blocks next to the shard's edges.
Rotating whole shards round the ring (`block_sparse.py`) then sends
almost nothing that is used. Here each rank receives exactly the keys its
queries may attend (`_needed_keys`, from positions alone, the same plan on
every rank) in one ``all_to_all_single``, attends its own shard and each
source's received keys as dense blocks through the fused kernels
(`dense_blocks`, planned per source by `tile_blocks`), merging each
source into the rows it meets by log-sum-exp (in place: a remote source's
few rows cost no pass over the whole output). The backward runs each source's
block backward from the merged output and log-sum-exp, and one more
``all_to_all_single`` sends each received key's gradient back to its
owner, who adds it at the key's row.

`exchange_plan` chooses this over the ring only where it sends less: when
no rank needs more keys from the others than one shard holds (the ring
sends W - 1 shards to every rank, and holds two at a time; this holds at
most one more). ``mask_mod`` patterns (token level, may depend on batch and
head) always take the ring.

Collectives (see `dense.exchange`): every rank issues the same two, in
the same order, each carrying a one-element link so the backward one
depends on the output gradient; the received buffers are tied to the
results, so no rank drops a collective as dead code.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from functools import lru_cache

import torch

from ...policy.specs import BlockPattern
from ...sharding import position_list
from ..common import dense_blocks
from ..common.autograd_output import returned_output
from ..block_sparse.patterns import blocks_active
from ..common.constants import outside_tracing
from ..common.block_kernels import accumulation_dtype
from .dense import exchange, tie


@dataclass(frozen=True)
class ExchangePlan:
    """One rank's block-sparse attention by key exchange; all from shapes and setup."""

    world_size: int
    rank: int
    n: int  # local shard length
    needed: tuple[tuple[int, ...], ...]  # by source rank: its local key rows used here (own: ())
    send: tuple[tuple[int, ...], ...]  # by destination rank: this rank's key rows used there
    # by source rank: dense blocks (`dense_blocks.group`) of this rank's rows against the source's
    # keys: its `needed` rows in order, or (own shard) all of them
    groups: tuple[tuple, ...]


def _needed_keys(
    pattern: BlockPattern, block_size: int, is_causal: bool, qpos: list[int], kpos: list[int]
) -> tuple[int, ...]:
    """Local indices (ascending) of the keys at `kpos` that some query at `qpos` may attend
    (global positions; a key block is used by the query blocks the pattern pairs it with, and
    with causal masking only up to the last of those queries)."""
    if not qpos or not kpos:
        return ()
    q_last: dict[int, int] = {}
    for p in qpos:
        q_last[p // block_size] = max(q_last.get(p // block_size, p), p)
    keys_by_block: dict[int, list[int]] = {}
    for j, p in enumerate(kpos):
        keys_by_block.setdefault(p // block_size, []).append(j)
    qbs, kbs = sorted(q_last), sorted(keys_by_block)
    active = blocks_active(pattern, torch.tensor(qbs)[:, None], torch.tensor(kbs)[None, :])
    last = torch.tensor([q_last[b] for b in qbs])[:, None].expand_as(active)
    big = max(kpos) + 1  # every key is at or before it: no causal limit
    limit = torch.where(active, last if is_causal else torch.full_like(last, big), -1).amax(dim=0)
    return tuple(
        j for kb, lim in zip(kbs, limit.tolist()) for j in keys_by_block[kb] if kpos[j] <= lim
    )


def tile_blocks(
    pattern: BlockPattern, block_size: int, is_causal: bool, qpos: list[int], kpos: list[int]
) -> tuple:
    """The dense blocks (`dense_blocks.group`) of queries at `qpos` against keys at `kpos`
    (global positions; indices into both) under a block-level pattern.

    The pattern holds or not for a whole (query block, key block) tile, so
    each run of consecutive query positions of a query block sees every key
    of its active key blocks in full; with causal masking only those before
    the run in full, plus the run's own positions as a causal square where
    the keys hold them (the rank's own shard).
    """
    rows_by_block: dict[int, list[tuple[int, int]]] = {}
    keys_by_block: dict[int, list[tuple[int, int]]] = {}
    for i, p in enumerate(qpos):
        rows_by_block.setdefault(p // block_size, []).append((p, i))
    for j, p in enumerate(kpos):
        keys_by_block.setdefault(p // block_size, []).append((p, j))
    if not rows_by_block or not keys_by_block:
        return ()
    qbs, kbs = sorted(rows_by_block), sorted(keys_by_block)
    active = blocks_active(pattern, torch.tensor(qbs)[:, None], torch.tensor(kbs)[None, :]).tolist()
    key_at = {p: j for j, p in enumerate(kpos)}
    blocks = []
    for qb, on in zip(qbs, active):
        keys = sorted(pk for kb, a in zip(kbs, on) if a for pk in keys_by_block[kb])
        if not keys:
            continue
        rows = sorted(rows_by_block[qb])
        if not is_causal:
            blocks.append(([i for _, i in rows], [j for _, j in keys], []))
            continue
        for run in dense_blocks.runs(rows, 1):
            first, last = run[0][0], run[-1][0]
            full = [j for p, j in keys if p < first]
            inside = [p for p, _ in keys if first <= p <= last]
            if inside and len(inside) != len(run):  # keys between the run's rows: not a square
                raise ValueError("block-sparse ring: a shard's keys interleave another's rows")
            diag = [key_at[p] for p, _ in run] if inside else []
            if full or diag:
                blocks.append(([i for _, i in run], full, diag))
    return dense_blocks.group(blocks)


@lru_cache(maxsize=256)
def _pair_needed(
    world_size: int, rank: int, source: int, n: int, layout: str, is_causal: bool,
    pattern_fields: tuple, block_size: int,
) -> tuple[int, ...]:
    """`_needed_keys` of rank's queries and source's keys."""
    total = n * world_size
    with outside_tracing():
        return _needed_keys(
            BlockPattern(*pattern_fields), block_size, is_causal,
            position_list(total, layout, rank, world_size),
            position_list(total, layout, source, world_size),
        )


@lru_cache(maxsize=64)
def _cached_plan(
    world_size: int, rank: int, n: int, layout: str, is_causal: bool, pattern_fields: tuple,
    block_size: int,
) -> ExchangePlan | None:
    """`exchange_plan`, computed once per setup."""
    def needed(r: int, s: int) -> tuple[int, ...]:
        return _pair_needed(world_size, r, s, n, layout, is_causal, pattern_fields, block_size)

    remote = [sum(len(needed(r, s)) for s in range(world_size) if s != r) for r in range(world_size)]
    if max(remote) > n:
        return None
    pattern, total = BlockPattern(*pattern_fields), n * world_size
    with outside_tracing():
        mine = position_list(total, layout, rank, world_size)
        groups = []
        for s in range(world_size):
            theirs = position_list(total, layout, s, world_size)
            keys = theirs if s == rank else [theirs[j] for j in needed(rank, s)]
            groups.append(tile_blocks(pattern, block_size, is_causal, mine, keys))
    return ExchangePlan(
        world_size, rank, n,
        tuple(() if s == rank else needed(rank, s) for s in range(world_size)),
        tuple(() if d == rank else needed(d, rank) for d in range(world_size)),
        tuple(groups),
    )


@torch._dynamo.assume_constant_result
def _plan_fields(
    world_size: int, rank: int, n: int, layout: str, is_causal: bool, pattern_fields: tuple,
    block_size: int,
) -> tuple:
    """The plan as plain tuples, () where the ring sends less (a constant to Dynamo)."""
    plan = _cached_plan(world_size, rank, n, layout, is_causal, pattern_fields, block_size)
    return () if plan is None else tuple(getattr(plan, f.name) for f in fields(ExchangePlan))


def exchange_plan(
    world_size: int, rank: int, n: int, layout: str, is_causal: bool, pattern: BlockPattern,
    block_size: int,
) -> ExchangePlan | None:
    """This rank's plan, or None where the ring sends less (or the pattern is a mask_mod, or has
    a token window: `window_exchange.py`)."""
    if world_size == 1 or pattern.kind == "mask_mod" or pattern.token_window is not None:
        return None
    values = _plan_fields(
        world_size, rank, n, layout, bool(is_causal), pattern.as_tuple(), int(block_size)
    )
    return ExchangePlan(*values) if values else None


# --------------------------------------------------------------------------
# forward / backward


def _counts(plan: ExchangePlan, rows, per_key: int) -> list[int]:
    """Element counts by rank of a buffer holding k and v rows `rows[rank]` for each rank."""
    return [2 * len(rows[r]) * per_key for r in range(plan.world_size)]


def _keys_by_source(plan: ExchangePlan, k, v, received):
    """Per source rank, its (B, H, c, D) keys and values here, or None where none are used."""
    b, h, d = k.shape[0], k.shape[1], k.shape[-1]
    out, offset = [], 0
    for s, rows in enumerate(plan.needed):
        if s == plan.rank:
            out.append((k, v))
            continue
        if not rows:
            out.append(None)
            continue
        size = b * h * len(rows) * d
        ks = received[offset : offset + size].view(b, h, len(rows), d)
        vs = received[offset + size : offset + 2 * size].view(b, h, len(rows), d)
        out.append((ks, vs))
        offset += 2 * size
    return out


def gather_keys(plan: ExchangePlan, k, v, group_name: str) -> torch.Tensor:
    """The keys and values this rank's queries use from the other ranks, received as one flat
    buffer (by source rank: its key rows, then its value rows)."""
    parts = [
        x.index_select(2, dense_blocks.index_of(rows, x)).reshape(-1)
        for rows in plan.send if rows for x in (k, v)
    ]
    per_key = k.shape[0] * k.shape[1] * k.shape[-1]
    received, _ = exchange(
        plan.world_size, plan.rank, parts, _counts(plan, plan.needed, per_key),
        _counts(plan, plan.send, per_key), k.reshape(-1)[:1], group_name,
    )
    return received


def exchange_forward(plan: ExchangePlan, q, k, v, scale: float, group_name: str):
    """(out in the accumulation dtype, lse, received keys/values) of this rank's queries."""
    received = gather_keys(plan, k, v, group_name)
    sources = _keys_by_source(plan, k, v, received)
    # the own shard first (every row), then each source's keys merged in at the rows they meet
    out, lse = dense_blocks.attention(q, k, v, plan.groups[plan.rank], scale)
    for s, (kv, groups) in enumerate(zip(sources, plan.groups)):
        if s != plan.rank and kv is not None:
            dense_blocks.attention(q, kv[0], kv[1], groups, scale, into=(out, lse))
    return tie(out, [received]), lse, received


def exchange_backward(plan: ExchangePlan, dout, q, k, v, out, lse, received, scale: float,
                      group_name: str):
    """(dq, dk, dv) of this rank's shards, from the merged out and lse."""
    acc = accumulation_dtype(q)
    own = plan.groups[plan.rank]
    dq, dk, dv = dense_blocks.attention_backward(dout, q, k, v, out, lse, own, scale)
    back = []  # gradients of the received keys/values, by source rank
    for s, (kv, groups) in enumerate(zip(_keys_by_source(plan, k, v, received), plan.groups)):
        if s != plan.rank and kv is not None:
            _, gk, gv = dense_blocks.attention_backward(
                dout, q, kv[0], kv[1], out, lse, groups, scale, dq=dq
            )
            back += [gk.reshape(-1), gv.reshape(-1)]
    per_key = k.shape[0] * k.shape[1] * k.shape[-1]
    got, _ = exchange(
        plan.world_size, plan.rank, back, _counts(plan, plan.send, per_key),
        _counts(plan, plan.needed, per_key), dout.reshape(-1)[:1].to(acc), group_name,
    )
    b, h, d = k.shape[0], k.shape[1], k.shape[-1]
    offset = 0
    for rows in plan.send:  # the gradients of this rank's keys that rank used, in rank order
        if not rows:
            continue
        size = b * h * len(rows) * d
        idx = dense_blocks.index_of(rows, dk)
        dk.index_add_(2, idx, got[offset : offset + size].view(b, h, len(rows), d))
        dv.index_add_(2, idx, got[offset + size : offset + 2 * size].view(b, h, len(rows), d))
        offset += 2 * size
    return tie(dq, [got]).to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class BlockSparseExchange(torch.autograd.Function):
    """Block-sparse attention by key exchange over this rank's shards as one autograd node."""

    @staticmethod
    def forward(ctx, plan: ExchangePlan, scale: float, group_name: str, q, k, v):
        out, lse, received = exchange_forward(plan, q, k, v, scale, group_name)
        ctx.plan, ctx.scale, ctx.group_name = plan, scale, group_name
        ctx.save_for_backward(q, k, v, out, lse, received)
        return returned_output(out.to(q.dtype))

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, received = ctx.saved_tensors
        dq, dk, dv = exchange_backward(
            ctx.plan, dout.contiguous(), q, k, v, out, lse, received, ctx.scale, ctx.group_name
        )
        return None, None, None, dq, dk, dv
