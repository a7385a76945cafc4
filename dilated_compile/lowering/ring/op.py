"""Ring attention for sites whose sequence length is symbolic (dynamic shapes).

The ring counterpart of `dynamic.py` and `dynamic_block_sparse.py`: a ring
site with a symbolic length calls the opaque custom op
``torch.ops.dilated_compile.ring_attention``. Its fake implementation only
gives the output's shape and layout (no guard on the length, one graph for
every length); its real implementation runs the eager ring lowering of
`ring.py` at the concrete local length and returns (out, lse). The backward
is a second custom op, ``ring_attention_backward``, which calls the rings'
explicit backward functions from the saved out and lse (autograd is off
inside a custom op's implementation):

- ``"dense"``: `ring_dense.ring_forward` / `ring_backward` with a `Schedule`
  (cached by `make_schedule`);
- ``"block_sparse"``: `ring_block_exchange.exchange_forward` /
  `exchange_backward` where the key exchange sends less than the ring (its
  backward, like the dilated one below, redoes the key exchange first), else
  the dense ring's functions with a `BlockSparseSchedule` (its boxes cached
  by `ring_block_sparse`);
- ``"dilated"``: `dilated.dilated_forward` / `dilated_backward` on the shard
  when every segment lies inside one run of it (nothing is sent), else
  `ring_dilated.dilated_ring_forward` / `dilated_ring_backward` (plans
  cached here). The static path saves the gathered remote
  keys/values for the backward; the op cannot save a variable number of
  tensors, so its backward *redoes the key exchange* (one more all-to-all of
  the selected keys/values, the size of the forward's) before the gradient
  exchange. The cost: the backward sends the forward's bytes once more.

Collectives run eagerly inside the op (functional collectives outside a
trace work eagerly). Every rank runs the same ops in the same order as long
as all ranks call the op for the same sites with the same lengths (the
backend checks the sites at compile time, `passes.check_rings_agree`; the
lengths are the caller's contract, as for any sharded model), so the ring
cannot deadlock: everything the op decides at run time (min_seq_len, whether
dilated segments fit in a shard, plans, schedules) depends only on the local
length and constants that are the same on every rank.

The ring travels as op arguments (world_size, rank, group_name, layout) with
the inner attention's parameters: segments/rates/head_split for dilated, and
block_size plus `dynamic_block_sparse.pattern_args` (kind, window, stride,
global_blocks; -1 for a field the kind has no use for; a ``mask_mod``
pattern's function as its import path) for block_sparse.

``min_seq_len`` (a global length: shard x world size) is decided per call.
For a ring rule the static path leaves a site whose global length is below
it as it was: the unchanged SDPA, which attends over this rank's own shard
only. The op does the same below it (ordinary attention of the local q, k,
v, no communication), so a model computes the same function whether it was
compiled with static or dynamic shapes.

Outputs are stored sequence-major like `dynamic.py`'s.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from functools import lru_cache
from typing import Any, Sequence

import torch

from ..policy import BlockPattern
from .block_patterns import as_pattern
from .dilated import check_dilated_args, check_qkv, dilated_backward, dilated_forward, plan_for
from .kernels import accumulation_dtype
from .dynamic import (
    OP_NAMESPACE,
    _in_seq_major,
    _lse_fake,
    _seq_major_empty,
    register_backward_from_lse,
)
from .dynamic_block_sparse import effective_pattern as _block_pattern_at, pattern_args
from .ring import INNERS, check_local_shape, dilated_segments_local
from .ring_block_exchange import ExchangePlan, exchange_backward, exchange_forward, gather_keys
from .ring_block_sparse import make_block_sparse_plan
from .ring_dense import make_schedule, ring_backward, ring_forward
from .ring_dilated import DilatedRingPlan, _gather_keys, dilated_ring_backward, dilated_ring_forward, make_dilated_plan
from .view_replay import opaque_op


@lru_cache(maxsize=64)
def _dilated_ring_plan(
    world_size: int, rank: int, n: int, layout: str, is_causal: bool, num_heads: int,
    segment_lengths: tuple[int, ...], dilation_rates: tuple[int, ...], head_split: str,
) -> DilatedRingPlan:
    """`make_dilated_plan`, cached as a whole (it rebuilds its tuples from the cached plan)."""
    return make_dilated_plan(
        world_size, rank, n, layout, is_causal, num_heads, segment_lengths, dilation_rates, head_split
    )


def _check(q: torch.Tensor, world_size: int, layout: str, inner: str) -> None:
    """Run-time checks the static path makes at compile time (the same on every rank)."""
    if inner not in INNERS:
        raise ValueError(f"inner={inner!r}: expected one of {', '.join(map(repr, INNERS))}")
    check_local_shape(q.shape[2], layout, world_size)


def _below_min(q: torch.Tensor, world_size: int, min_seq_len: int) -> bool:
    """Whether the global length is below min_seq_len: the site runs as the static path leaves
    it, ordinary attention over this rank's shard only (see the module docstring)."""
    return q.shape[2] * world_size < min_seq_len


def _local_schedule(q: torch.Tensor, is_causal: bool):
    """A one-rank dense schedule: plain (causal) attention of the local shard, no collectives."""
    return make_schedule(1, 0, q.shape[2], "contiguous", bool(is_causal))


def _dense_like_plan(q, world_size, rank, layout, is_causal, block_size, kind, window, stride,
                     global_blocks, function):
    """The ring schedule of the dense or block-sparse inner attention at q's length, or the
    block-sparse key-exchange plan where that sends less (`ring_block_exchange`)."""
    n = q.shape[2]
    if world_size == 1:  # one rank holds the whole sequence, in order, whatever the layout
        layout = "contiguous"
    if kind == "":  # dense
        return make_schedule(world_size, rank, n, layout, bool(is_causal))
    pattern = _block_pattern_at(n * world_size, block_size, kind, window, stride, global_blocks, function, 0)
    return make_block_sparse_plan(world_size, rank, n, layout, bool(is_causal), pattern, block_size)


def _dilated_route(q, world_size, rank, layout, is_causal, segment_lengths, dilation_rates, head_split):
    """("local", dilated Plan) when every segment lies inside a run of the shard, else
    ("ring", DilatedRingPlan)."""
    seg, rates = tuple(segment_lengths), tuple(dilation_rates)
    n = q.shape[2]
    if dilated_segments_local(seg, n, layout, world_size):
        return "local", plan_for(q, seg, rates, head_split)
    plan = _dilated_ring_plan(world_size, rank, n, layout, bool(is_causal), q.shape[1], seg, rates, head_split)
    return "ring", plan


@opaque_op(f"{OP_NAMESPACE}::ring_attention")
def ring_attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    world_size: int,
    rank: int,
    group_name: str,
    inner: str,
    layout: str,
    is_causal: bool,
    scale: float,
    segment_lengths: list[int],
    dilation_rates: list[int],
    head_split: str,
    block_size: int,
    kind: str,
    window: int,
    stride: int,
    global_blocks: int,
    function: str,
    min_seq_len: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) of this rank's shard of ring attention at the run-time length.

    `inner` "dense" (block-sparse fields unused: kind ""), "dilated"
    (segment_lengths, dilation_rates, head_split) or "block_sparse"
    (block_size, kind, window, stride, global_blocks, function). Below `min_seq_len`
    (global length) ordinary attention of the local shard, as the static path.
    """
    _check(q, world_size, layout, inner)
    if _below_min(q, world_size, min_seq_len):
        out, lse, _ = ring_forward(_local_schedule(q, is_causal), q, k, v, scale, "")
    elif inner == "dilated":
        route, plan = _dilated_route(
            q, world_size, rank, layout, is_causal, segment_lengths, dilation_rates, head_split
        )
        if route == "local":
            out, lse = dilated_forward(plan, is_causal, scale, q, k, v)
        else:
            out, lse, _ = dilated_ring_forward(plan, q, k, v, scale, group_name)
    else:
        sched = _dense_like_plan(
            q, world_size, rank, layout, is_causal, block_size,
            kind if inner == "block_sparse" else "", window, stride, global_blocks, function,
        )
        if isinstance(sched, ExchangePlan):
            out, lse, _ = exchange_forward(sched, q, k, v, scale, group_name)
        else:
            out, lse, _ = ring_forward(sched, q, k, v, scale, group_name)
    return _in_seq_major(out.to(q.dtype)), _in_seq_major(lse.to(accumulation_dtype(q)))


@ring_attention_op.register_fake
def _(q, k, v, world_size, rank, group_name, inner, layout, is_causal, scale, segment_lengths,
      dilation_rates, head_split, block_size, kind, window, stride, global_blocks, function, min_seq_len):
    return _seq_major_empty(q, q.shape, q.dtype), _lse_fake(q)


@opaque_op(f"{OP_NAMESPACE}::ring_attention_backward")
def ring_attention_backward_op(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    world_size: int,
    rank: int,
    group_name: str,
    inner: str,
    layout: str,
    is_causal: bool,
    scale: float,
    segment_lengths: list[int],
    dilation_rates: list[int],
    head_split: str,
    block_size: int,
    kind: str,
    window: int,
    stride: int,
    global_blocks: int,
    function: str,
    min_seq_len: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of `ring_attention_op` from its saved out and lse (collectives as its forward)."""
    _check(q, world_size, layout, inner)
    dout = dout.to(q.dtype).contiguous()
    if _below_min(q, world_size, min_seq_len):
        grads = ring_backward(_local_schedule(q, is_causal), dout, q, k, v, out, lse, scale, "")
    elif inner == "dilated":
        route, plan = _dilated_route(
            q, world_size, rank, layout, is_causal, segment_lengths, dilation_rates, head_split
        )
        if route == "local":
            grads = dilated_backward(plan, is_causal, scale, q, k, v, out, lse, dout)
        else:
            grads = _dilated_ring_backward(plan, dout, q, k, v, out, lse, scale, group_name)
    else:
        sched = _dense_like_plan(
            q, world_size, rank, layout, is_causal, block_size,
            kind if inner == "block_sparse" else "", window, stride, global_blocks, function,
        )
        if isinstance(sched, ExchangePlan):
            received = gather_keys(sched, k, v, group_name)  # again (see _dilated_ring_backward)
            grads = exchange_backward(sched, dout, q, k, v, out, lse, received, scale, group_name)
        else:
            grads = ring_backward(sched, dout, q, k, v, out, lse, scale, group_name)
    return tuple(_in_seq_major(g.to(x.dtype)) for g, x in zip(grads, (q, k, v)))


def _dilated_ring_backward(plan: DilatedRingPlan, dout, q, k, v, out, lse, scale: float, group_name: str):
    """`dilated_ring_backward`, first gathering the remote keys/values again.

    The forward op cannot hand its gathered keys/values (a plan-dependent
    number of tensors) to the backward, so the backward redoes the forward's
    exchange: one more all-to-all of the same size, then the gradient one.
    Every rank does both, in this order, so the collectives still match.
    """
    gathered, _ = _gather_keys(plan, k, v, group_name)
    return dilated_ring_backward(plan, dout, q, k, v, out, lse, gathered, scale, group_name)


@ring_attention_backward_op.register_fake
def _(dout, q, k, v, out, lse, world_size, rank, group_name, inner, layout, is_causal, scale,
      segment_lengths, dilation_rates, head_split, block_size, kind, window, stride, global_blocks,
      function, min_seq_len):
    return tuple(_seq_major_empty(x, x.shape, x.dtype) for x in (q, k, v))


register_backward_from_lse(ring_attention_op, ring_attention_backward_op)


def ring_op_args(
    inner: str,
    segment_lengths: Sequence[int] | None = None,
    dilation_rates: Sequence[int] | None = None,
    head_split: str = "groups",
    block_size: int | None = None,
    pattern: BlockPattern | Mapping | Callable | Any = None,
) -> list:
    """[segment_lengths, dilation_rates, head_split, block_size, kind, window, stride,
    global_blocks, function]: the inner attention's parameters as op arguments (neutral
    values for the fields the inner has no use for)."""
    seg, rates, split = [], [], head_split
    bs, fields = 0, ["", -1, -1, -1, ""]
    if inner == "dilated":
        s, r = check_dilated_args(segment_lengths or (), dilation_rates or (), head_split)
        seg, rates = list(s), list(r)
    elif inner == "block_sparse":
        if block_size is None or pattern is None:
            raise ValueError('ring attention with inner="block_sparse" needs block_size and pattern')
        bs, fields = int(block_size), pattern_args(as_pattern(pattern, block_size))
    elif inner != "dense":
        raise ValueError(f"inner={inner!r}: expected one of {', '.join(map(repr, INNERS))}")
    return [seg, rates, split, bs, *fields]


def dynamic_ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    world_size: int,
    rank: int,
    group_name: str | None,
    inner: str = "dense",
    layout: str = "contiguous",
    is_causal: bool = False,
    scale: float | None = None,
    segment_lengths: Sequence[int] | None = None,
    dilation_rates: Sequence[int] | None = None,
    head_split: str = "groups",
    block_size: int | None = None,
    pattern: Any = None,
    min_seq_len: int = 0,
) -> torch.Tensor:
    """`ring.ring_attention_local` through the custom op: any local length, no guard on it.

    The ring is given as constants (`sharding.ring_info` at compile time).
    At global lengths >= `min_seq_len` the same function as
    `ring_attention_local`; below it ordinary attention of the local shard
    (what the static path's left site computes). Differentiable.
    """
    check_qkv(q, k, v)
    if world_size > 1 and not group_name:
        raise ValueError("ring attention over more than one rank needs a process group name")
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    args = ring_op_args(inner, segment_lengths, dilation_rates, head_split, block_size, pattern)
    out, _ = ring_attention_op(
        q, k, v, int(world_size), int(rank), group_name or "", inner, layout, bool(is_causal),
        float(scale), *args, int(min_seq_len),
    )
    return out
