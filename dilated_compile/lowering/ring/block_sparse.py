"""Block-sparse ring attention, forward and backward (docs/spec.md, "Block-sparse attention" and "Ring attention").

`ring_block_sparse` hands a built-in pattern whose queries use at most a
shard of the other ranks' keys to the key exchange (`block_exchange.py`:
only those keys move). Everything else runs the ring below.

The ring of `dense.py` (key/value shards move one rank per step through
functional collectives; key/value gradients travel back with them in the
backward), with a different step: this rank's queries attend the source
shard's keys under the block-sparse pattern evaluated on *global* query and
key positions, causal per token on global positions, restricted to the
rows and keys of the pair's active blocks (their bounding box). A step whose
(rank, source) pair has no active block is skipped, but the shard is still
passed along (every rank issues the same collectives). Partials merge by
log-sum-exp; each step's backward uses the merged output and log-sum-exp; a
query with no allowed key anywhere gets 0 and gradient 0.

A step attends each box as dense blocks through the fused kernels
(`dense_blocks`, cuDNN/flash on GPUs): the pattern is decided per (query
block, key block) tile, so each run of consecutive query rows of a query
block sees the keys of its active key blocks in full (with causal masking:
those before the run) plus, with causal masking, its own positions as a
causal square. The blocks are planned from positions alone (`_box_groups`).
A ``mask_mod`` pattern (token level, may depend on batch and head), or one
with a token window that the key exchange does not take, is one masked
float32 attention (`masked.py`) per box instead, and only there is
a box of more than `MAX_BOX_PAIRS` (query, key) pairs split by query rows
into at most `MAX_BOXES` boxes, each narrowed to its rows' keys: this bounds
what one masked call holds. Built-in patterns keep one box per shard pair,
so blocks of one shape across the whole pair run as one batched call (each
box is its own calls: splitting only adds kernel launches there).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from ...policy.specs import BlockPattern
from ...sharding import position_list
from ..common import dense_blocks
from ..block_sparse.patterns import blocks_active, evaluate_mask_mod, token_mask_mod
from ..common.constants import outside_tracing
from .block_exchange import BlockSparseExchange, ExchangePlan, exchange_plan, tile_blocks
from .dense import Call, RingDense, Schedule
from .masked import masked_attention, masked_attention_backward
from .window_exchange import WindowExchange, WindowPlan, allowed_pairs, window_plan


@dataclass(frozen=True)
class BlockSparseSchedule(Schedule):
    """A dense ring's schedule whose steps are block-sparse attentions (dense blocks, or masked)."""

    gradients_in_input_dtype = False  # steps return gradients in the accumulation dtype

    pattern: BlockPattern = None  # type: ignore[assignment]
    block_size: int = 0
    boxes: tuple[tuple[Box, ...], ...] = ()  # by source rank: row ranges and their keys with allowed pairs
    # by source rank, per box: its dense blocks (`dense_blocks.group`), None for a mask_mod pattern
    groups: tuple[tuple, ...] = ()

    def calls(self, rank: int, source: int) -> tuple[Call, ...]:
        return tuple(Call(*box, False) for box in self.boxes[source])

    def positions(self, rank: int, device) -> torch.Tensor:
        """Global positions of `rank`'s shard, built in the graph from ranges."""
        chunks = (rank,) if self.layout == "contiguous" or self.world_size == 1 else (
            rank, 2 * self.world_size - 1 - rank)
        size = self.n // len(chunks)
        return torch.cat([torch.arange(c * size, (c + 1) * size, device=device) for c in chunks])

    def mask(self, source: int, c: Call, q: torch.Tensor) -> torch.Tensor:
        """(m, M) or (B, H, m, M) bool: allowed pairs of this call's queries and keys."""
        qpos = self.positions(self.rank, q.device)[c.q0 : c.q1]
        kpos = self.positions(source, q.device)[c.k0 : c.k1]
        if self.pattern.kind == "mask_mod":
            user = token_mask_mod(self.pattern, self.block_size, self.is_causal)
            return evaluate_mask_mod(user, q.shape[0], q.shape[1], qpos, kpos)
        return allowed_pairs(self.pattern, self.block_size, self.is_causal, qpos, kpos)

    def blocks(self, source: int, c: Call):
        """The dense blocks of call `c` (None: attend with the token mask)."""
        box = (c.q0, c.q1, c.k0, c.k1)
        return next(g for b, g in zip(self.boxes[source], self.groups[source]) if b == box)

    def attend(self, source: int, c: Call, q, k, v, scale: float):
        groups = self.blocks(source, c)
        if groups is None:
            return masked_attention(q, k, v, self.mask(source, c, q), scale)
        return dense_blocks.attention(q, k, v, groups, scale)

    def attend_backward(self, source: int, c: Call, dout, q, k, v, out, lse, scale: float):
        groups = self.blocks(source, c)
        if groups is None:
            return masked_attention_backward(dout, q, k, v, self.mask(source, c, q), out, lse, scale)
        return dense_blocks.attention_backward(dout, q, k, v, out, lse, groups, scale)


Box = tuple[int, int, int, int]  # query rows [q0, q1), key rows [k0, k1) of a shard pair


def _pair_box(
    pattern: BlockPattern, block_size: int, is_causal: bool, qpos: list[int], kpos: list[int]
) -> Box | None:
    """The local rows and columns of the shard pair (queries at `qpos`, keys at `kpos`, global
    positions) that hold every allowed pair; None when no pair is allowed."""
    if not qpos or not kpos:
        return None
    if pattern.kind == "mask_mod":  # token level, may depend on batch and head: only causal skips
        return (0, len(qpos), 0, len(kpos)) if not is_causal or min(kpos) <= max(qpos) else None
    qmax: dict[int, int] = {}
    for p in qpos:
        qmax[p // block_size] = max(qmax.get(p // block_size, -1), p)
    kmin: dict[int, int] = {}
    for p in kpos:
        kmin[p // block_size] = min(kmin.get(p // block_size, p), p)
    qb, kb = torch.tensor(list(qmax)), torch.tensor(list(kmin))
    active = blocks_active(pattern, qb[:, None], kb[None, :])
    if is_causal:  # some key of the key block at or before some query of the query block
        first_key, last_query = torch.tensor(list(kmin.values())), torch.tensor(list(qmax.values()))
        active = active & (first_key[None, :] <= last_query[:, None])
    if not bool(active.any()):
        return None
    q_on = set(qb[active.any(dim=1)].tolist())
    k_on = set(kb[active.any(dim=0)].tolist())
    rows = [i for i, p in enumerate(qpos) if p // block_size in q_on]
    cols = [i for i, p in enumerate(kpos) if p // block_size in k_on]
    return (rows[0], rows[-1] + 1, cols[0], cols[-1] + 1)


# Query x key positions above which a mask_mod pattern's box of a shard pair is split by query
# rows (into at most MAX_BOXES boxes, each with its own keys): the masked attention of one box
# holds float32 scores for every pair of it, and a local pattern's keys narrow with its rows.
MAX_BOX_PAIRS = 1 << 22
MAX_BOXES = 8
NO_SPLIT = 1 << 62  # max_pairs of built-in patterns (dense blocks)


def _pair_boxes(
    pattern: BlockPattern, block_size: int, is_causal: bool, qpos: list[int], kpos: list[int],
    max_pairs: int,
) -> tuple[Box, ...]:
    """`_pair_box` of the shard pair, split into boxes of consecutive query rows (a multiple of
    the block size each) when it holds more than `max_pairs` pairs; each box is narrowed to its
    rows' allowed keys, and boxes without allowed pairs are dropped."""
    box = _pair_box(pattern, block_size, is_causal, qpos, kpos)
    if box is None:
        return ()
    q0, q1, k0, k1 = box
    pieces = min(MAX_BOXES, -(-(q1 - q0) * (k1 - k0) // max_pairs))
    if pieces <= 1:
        return (box,)
    rows = block_size * -(-(q1 - q0) // (pieces * block_size))
    out = []
    for start in range(q0, q1, rows):
        part = _pair_box(pattern, block_size, is_causal, qpos[start : min(start + rows, q1)], kpos)
        if part is not None:
            out.append((part[0] + start, part[1] + start, part[2], part[3]))
    return tuple(out)


@torch._dynamo.assume_constant_result
def _box_groups(
    world_size: int, rank: int, n: int, layout: str, is_causal: bool,
    pattern_fields: tuple, block_size: int, max_pairs: int,
) -> tuple[tuple, ...]:
    """By source rank, per box of `_boxes`, its dense blocks; None for a mask_mod pattern
    (a constant to Dynamo)."""
    return _cached_box_groups(world_size, rank, n, layout, is_causal, pattern_fields, block_size, max_pairs)


@lru_cache(maxsize=64)
def _cached_box_groups(
    world_size: int, rank: int, n: int, layout: str, is_causal: bool,
    pattern_fields: tuple, block_size: int, max_pairs: int,
) -> tuple[tuple, ...]:
    """`_box_groups`, computed once per setup."""
    boxes = _cached_boxes(world_size, rank, n, layout, is_causal, pattern_fields, block_size, max_pairs)
    pattern = BlockPattern(*pattern_fields)
    if _token_level(pattern):
        return tuple((None,) * len(per_source) for per_source in boxes)
    total = n * world_size
    with outside_tracing():
        mine = position_list(total, layout, rank, world_size)
        out = []
        for source, per_source in enumerate(boxes):
            theirs = position_list(total, layout, source, world_size)
            out.append(tuple(
                tile_blocks(pattern, block_size, is_causal, mine[q0:q1], theirs[k0:k1])
                for q0, q1, k0, k1 in per_source
            ))
        return tuple(out)


@torch._dynamo.assume_constant_result
def _boxes(
    world_size: int, rank: int, n: int, layout: str, is_causal: bool,
    pattern_fields: tuple, block_size: int, max_pairs: int,
) -> tuple[tuple[Box, ...], ...]:
    """By source rank, the boxes of this rank's queries and that rank's keys with allowed pairs
    (a constant to Dynamo, which calls it without tracing)."""
    return _cached_boxes(world_size, rank, n, layout, is_causal, pattern_fields, block_size, max_pairs)


@lru_cache(maxsize=64)
def _cached_boxes(
    world_size: int, rank: int, n: int, layout: str, is_causal: bool,
    pattern_fields: tuple, block_size: int, max_pairs: int,
) -> tuple[tuple[Box, ...], ...]:
    """`_boxes`, computed once per setup (Python over every position: eager calls repeat it)."""
    pattern = BlockPattern(*pattern_fields)
    total = n * world_size
    with outside_tracing():
        mine = position_list(total, layout, rank, world_size)
        return tuple(
            _pair_boxes(pattern, block_size, is_causal, mine,
                        position_list(total, layout, s, world_size), max_pairs)
            for s in range(world_size)
        )


def make_block_sparse_schedule(
    world_size: int, rank: int, n: int, layout: str, is_causal: bool,
    pattern: BlockPattern, block_size: int,
) -> BlockSparseSchedule:
    """The schedule of one rank's block-sparse ring."""
    max_pairs = MAX_BOX_PAIRS if _token_level(pattern) else NO_SPLIT
    setup = (world_size, rank, n, layout, is_causal, pattern.as_tuple(), block_size, max_pairs)
    return BlockSparseSchedule(
        world_size, rank, n, layout, is_causal, pattern, block_size, _boxes(*setup), _box_groups(*setup)
    )


def _token_level(pattern: BlockPattern) -> bool:
    """Whether the pattern's steps need a token-level mask (a mask_mod, or a token window):
    masked attention per box, not dense blocks."""
    return pattern.kind == "mask_mod" or pattern.token_window is not None


def make_block_sparse_plan(
    world_size: int, rank: int, n: int, layout: str, is_causal: bool,
    pattern: BlockPattern, block_size: int,
) -> ExchangePlan | WindowPlan | BlockSparseSchedule:
    """How one rank's block-sparse attention over the ring runs: the key-exchange plan where
    that sends less than the ring (with a token window: `window_exchange.py`), else the ring's
    schedule (the static and dynamic paths both decide here)."""
    plan = exchange_plan(world_size, rank, n, layout, is_causal, pattern, block_size)
    if plan is None:
        plan = window_plan(world_size, rank, n, layout, is_causal, pattern, block_size)
    if plan is not None:
        return plan
    return make_block_sparse_schedule(world_size, rank, n, layout, is_causal, pattern, block_size)


def ring_block_sparse(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    world_size: int,
    rank: int,
    group_name: str | None,
    layout: str,
    is_causal: bool,
    scale: float,
    pattern: BlockPattern,
    block_size: int,
) -> torch.Tensor:
    """Block-sparse ring attention of this rank's shards; no checks (see attention.py). By key
    exchange where that sends less than the ring (`block_exchange.py`)."""
    plan = make_block_sparse_plan(
        world_size, rank, q.shape[-2], layout, bool(is_causal), pattern, int(block_size)
    )
    if isinstance(plan, WindowPlan):
        return WindowExchange.apply(
            plan, pattern, int(block_size), bool(is_causal), float(scale), group_name or "", q, k, v
        )
    run = BlockSparseExchange if isinstance(plan, ExchangePlan) else RingDense
    return run.apply(plan, float(scale), group_name or "", q, k, v)
