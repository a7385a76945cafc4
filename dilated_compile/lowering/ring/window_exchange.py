"""Block-sparse ring attention with a token window, by key exchange, forward and backward
(docs/spec.md, "Sliding windows" and "Ring attention").

A sliding window of W positions (|i - j| < W, and j <= i when causal) lets a
rank's queries see only the other ranks' keys within W - 1 positions of its
own: a few rows next to each edge of its shard, however the window compares
with the shard (smaller, equal, or spanning several shards). Each rank
receives exactly those keys (`needed`: within the window of some query here,
and allowed by the block pattern and causal masking) in one
``all_to_all_single`` (`block_exchange.gather_keys`), and attends its own
shard and each source's received keys as boxes of consecutive query rows
against the keys their windows reach (`boxes`): the work is proportional to
the window, not to the shard. Each box is one masked attention in the
accumulation dtype (`masked.py`), the mask the token-level pattern on global
positions; partials merge into the rows by log-sum-exp. The backward runs each
box's backward from the merged output and log-sum-exp, and one more
``all_to_all_single`` sends each received key's gradient back to its owner.

`window_plan` chooses this over the rotating ring where it sends less: where
the windows reach fewer keys of the other ranks than the ring's W - 1 shards.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, fields
from functools import lru_cache

import torch

from ...policy.specs import BlockPattern
from ...sharding import position_list
from ..block_sparse.patterns import blocks_active, in_window
from ..common import dense_blocks
from ..common.autograd_output import returned_output
from ..common.block_kernels import accumulation_dtype
from ..common.constants import outside_tracing
from ..common.merge import merge_by_lse
from .block_exchange import _counts, _keys_by_source, _needed_keys, gather_keys
from .dense import exchange, tie
from .masked import masked_attention, masked_attention_backward

# Query rows per box: half the window, within these bounds. A box of R rows holds scores for
# about R x (R + W) pairs (its rows and the window beyond them), so the work is about
# N x (R + W) in all; fewer rows mean fewer pairs but more calls.
MIN_BOX_ROWS = 64
MAX_BOX_ROWS = 1024

Box = tuple[int, int, int, int]  # query rows [q0, q1), key rows [k0, k1) (of the source's keys here)


@dataclass(frozen=True)
class WindowPlan:
    """One rank's windowed block-sparse attention by key exchange; all from shapes and setup."""

    world_size: int
    rank: int
    n: int  # local shard length
    needed: tuple[tuple[int, ...], ...]  # by source rank: its local key rows used here (own: ())
    send: tuple[tuple[int, ...], ...]  # by destination rank: this rank's key rows used there
    positions: tuple[int, ...]  # global positions of this rank's rows
    key_positions: tuple[tuple[int, ...], ...]  # by source rank: global positions of its keys here
    boxes: tuple[tuple[Box, ...], ...]  # by source rank: boxes of rows and those keys


def allowed_pairs(
    pattern: BlockPattern, block_size: int, is_causal: bool, qpos: torch.Tensor, kpos: torch.Tensor
) -> torch.Tensor:
    """(len(qpos), len(kpos)) bool: the pairs a built-in block pattern with its token window
    allows, causal per token (global positions)."""
    b = block_size
    allowed = blocks_active(
        pattern, torch.div(qpos, b, rounding_mode="floor")[:, None], torch.div(kpos, b, rounding_mode="floor")[None, :]
    )
    allowed = allowed & in_window(pattern.token_window, qpos[:, None], kpos[None, :])
    if is_causal:
        allowed = allowed & (kpos[None, :] <= qpos[:, None])
    return allowed


def _window_keys(window: int, is_causal: bool, qpos: list[int], kpos: list[int]) -> set[int]:
    """Indices of the keys at `kpos` within the window of some query at `qpos`."""
    queries = sorted(qpos)
    out = set()
    for j, p in enumerate(kpos):
        lo = p if is_causal else p - window + 1
        at = bisect.bisect_left(queries, lo)
        if at < len(queries) and queries[at] <= p + window - 1:
            out.add(j)
    return out


def _boxes(window: int, is_causal: bool, qpos: list[int], kpos: list[int]) -> tuple[Box, ...]:
    """Boxes covering every pair of queries at `qpos` and keys at ascending `kpos` within the
    window: runs of consecutive query positions, cut into pieces of about half the window
    (`MIN_BOX_ROWS`..`MAX_BOX_ROWS` rows), with the range of keys their windows reach."""
    if not qpos or not kpos:
        return ()
    rows = max(MIN_BOX_ROWS, min(window // 2, MAX_BOX_ROWS))
    out, start = [], 0
    for i in range(1, len(qpos) + 1):
        if i < len(qpos) and qpos[i] == qpos[i - 1] + 1 and i - start < rows:
            continue
        first, last = qpos[start], qpos[i - 1]
        k0 = bisect.bisect_left(kpos, first - window + 1)
        k1 = bisect.bisect_right(kpos, last if is_causal else last + window - 1)
        if k0 < k1:
            out.append((start, i, k0, k1))
        start = i
    return tuple(out)


@lru_cache(maxsize=64)
def _cached_plan(
    world_size: int, rank: int, n: int, layout: str, is_causal: bool, pattern_fields: tuple, block_size: int,
) -> WindowPlan | None:
    """`window_plan`, computed once per setup."""
    pattern, total = BlockPattern(*pattern_fields), n * world_size
    window = pattern.token_window
    with outside_tracing():
        pos = [position_list(total, layout, r, world_size) for r in range(world_size)]

        def needed(r: int, s: int) -> tuple[int, ...]:
            if r == s:
                return ()
            near = _window_keys(window, is_causal, pos[r], pos[s])
            return tuple(j for j in _needed_keys(pattern, block_size, is_causal, pos[r], pos[s]) if j in near)

        table = [[needed(r, s) for s in range(world_size)] for r in range(world_size)]
        if max(sum(len(rows) for rows in per_rank) for per_rank in table) >= (world_size - 1) * n:
            return None  # the ring sends no more
        keys = tuple(
            tuple(pos[s]) if s == rank else tuple(pos[s][j] for j in table[rank][s]) for s in range(world_size)
        )
        boxes = tuple(_boxes(window, is_causal, pos[rank], list(k)) for k in keys)
    return WindowPlan(
        world_size, rank, n, tuple(table[rank]), tuple(table[d][rank] for d in range(world_size)),
        tuple(pos[rank]), keys, boxes,
    )


@torch._dynamo.assume_constant_result
def _plan_fields(
    world_size: int, rank: int, n: int, layout: str, is_causal: bool, pattern_fields: tuple, block_size: int,
) -> tuple:
    """The plan as plain tuples, () where the ring sends less (a constant to Dynamo)."""
    plan = _cached_plan(world_size, rank, n, layout, is_causal, pattern_fields, block_size)
    return () if plan is None else tuple(getattr(plan, f.name) for f in fields(WindowPlan))


def window_plan(
    world_size: int, rank: int, n: int, layout: str, is_causal: bool, pattern: BlockPattern, block_size: int,
) -> WindowPlan | None:
    """This rank's plan for a built-in pattern with a token window, or None where the rotating
    ring sends less (or there is no window, or the pattern is a mask_mod)."""
    if world_size == 1 or pattern.token_window is None or pattern.kind == "mask_mod":
        return None
    values = _plan_fields(world_size, rank, n, layout, bool(is_causal), pattern.as_tuple(), int(block_size))
    return WindowPlan(*values) if values else None


def _box_inputs(plan: WindowPlan, source: int, box: Box, q, kv, pattern, block_size, is_causal):
    """(query rows, keys, values, mask) of one box."""
    q0, q1, k0, k1 = box
    qpos = dense_blocks.index_of(plan.positions, q)[q0:q1]
    kpos = dense_blocks.index_of(plan.key_positions[source], q)[k0:k1]
    mask = allowed_pairs(pattern, block_size, is_causal, qpos, kpos)
    return q[:, :, q0:q1], kv[0][:, :, k0:k1], kv[1][:, :, k0:k1], mask


def window_forward(plan: WindowPlan, q, k, v, scale: float, group_name: str, pattern, block_size, is_causal):
    """(out in the accumulation dtype, lse, received keys/values) of this rank's queries."""
    received = gather_keys(plan, k, v, group_name)
    acc = accumulation_dtype(q)
    out = q.new_zeros((*q.shape[:3], v.shape[-1]), dtype=acc)
    lse = q.new_full(q.shape[:3], float("-inf"), dtype=acc)
    for s, kv in enumerate(_keys_by_source(plan, k, v, received)):
        for box in plan.boxes[s] if kv is not None else ():
            qb, kb, vb, mask = _box_inputs(plan, s, box, q, kv, pattern, block_size, is_causal)
            o, l = masked_attention(qb, kb, vb, mask, scale)
            q0, q1 = box[0], box[1]
            merged, merged_lse = merge_by_lse([out[:, :, q0:q1], o], [lse[:, :, q0:q1], l])
            out[:, :, q0:q1] = merged
            lse[:, :, q0:q1] = merged_lse
    return tie(out, [received]), lse, received


def window_backward(plan: WindowPlan, dout, q, k, v, out, lse, received, scale: float, group_name: str,
                    pattern, block_size, is_causal):
    """(dq, dk, dv) of this rank's shards, from the merged out and lse."""
    acc = accumulation_dtype(q)
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    dk = torch.zeros(k.shape, dtype=acc, device=q.device)
    dv = torch.zeros(v.shape, dtype=acc, device=q.device)
    back = []  # gradients of the received keys/values, by source rank
    for s, kv in enumerate(_keys_by_source(plan, k, v, received)):
        if kv is None:
            continue
        own = s == plan.rank
        gk_all, gv_all = (dk, dv) if own else (torch.zeros_like(x, dtype=acc) for x in kv)
        for q0, q1, k0, k1 in plan.boxes[s]:
            qb, kb, vb, mask = _box_inputs(plan, s, (q0, q1, k0, k1), q, kv, pattern, block_size, is_causal)
            gq, gk, gv = masked_attention_backward(
                dout[:, :, q0:q1], qb, kb, vb, mask, out[:, :, q0:q1], lse[:, :, q0:q1], scale
            )
            dq[:, :, q0:q1] += gq
            gk_all[:, :, k0:k1] += gk
            gv_all[:, :, k0:k1] += gv
        if not own:
            back += [gk_all.reshape(-1), gv_all.reshape(-1)]
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


class WindowExchange(torch.autograd.Function):
    """Windowed block-sparse attention by key exchange over this rank's shards as one autograd node."""

    @staticmethod
    def forward(ctx, plan: WindowPlan, pattern: BlockPattern, block_size: int, is_causal: bool,
                scale: float, group_name: str, q, k, v):
        out, lse, received = window_forward(plan, q, k, v, scale, group_name, pattern, block_size, is_causal)
        ctx.setup = (plan, pattern, block_size, is_causal, scale, group_name)
        ctx.save_for_backward(q, k, v, out, lse, received)
        return returned_output(out.to(q.dtype))

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, received = ctx.saved_tensors
        plan, pattern, block_size, is_causal, scale, group_name = ctx.setup
        dq, dk, dv = window_backward(
            plan, dout.contiguous(), q, k, v, out, lse, received, scale, group_name, pattern, block_size, is_causal
        )
        return None, None, None, None, None, None, dq, dk, dv
