"""What computes dilated attention: the `Functions` record of its strategy.

As a ring's inner attention it sends nothing where every segment lies inside
one run of a shard (each rank runs `dilated_attention` on its own shard), else
one all-to-all exchanges exactly the selected keys/values (`ring/dilated.py`).
Inside the ring custom op the backward *redoes the key exchange*: the op
cannot hand a plan-dependent number of gathered tensors from its forward to
its backward, so the backward sends the forward's bytes once more.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from ...policy.specs import DilatedSpec
from ..ring.dilated import (
    DilatedRingPlan,
    _gather_keys,
    dilated_ring_backward,
    dilated_ring_forward,
    make_dilated_plan,
    ring_dilated,
)
from ..ring.layout import dilated_segments_local
from ..strategy import Functions, RingArgs
from .arguments import check_dilated_args
from .attention import dilated_attention
from .compute import dilated_backward, dilated_forward
from .op import dynamic_dilated_attention
from .plan import Plan, plan_for


def ring_inner(
    q, k, v, *, world_size, rank, group_name, layout, is_causal, scale,
    segment_lengths=None, dilation_rates=None, head_split="groups",
) -> torch.Tensor:
    """This rank's shard of dilated attention over the ring (static lengths)."""
    seg, rates = check_dilated_args(segment_lengths or (), dilation_rates or (), head_split)
    if dilated_segments_local(seg, q.shape[-2], layout, world_size):  # nothing to send
        return dilated_attention(q, k, v, seg, rates, head_split=head_split, is_causal=is_causal, scale=scale)
    return ring_dilated(
        q, k, v, world_size=world_size, rank=rank, group_name=group_name, layout=layout,
        is_causal=is_causal, scale=scale, segment_lengths=seg, dilation_rates=rates,
        head_split=head_split,
    )


@lru_cache(maxsize=64)
def _dilated_ring_plan(
    world_size: int, rank: int, n: int, layout: str, is_causal: bool, num_heads: int,
    segment_lengths: tuple[int, ...], dilation_rates: tuple[int, ...], head_split: str,
) -> DilatedRingPlan:
    """`make_dilated_plan`, cached as a whole (it rebuilds its tuples from the cached plan)."""
    return make_dilated_plan(
        world_size, rank, n, layout, is_causal, num_heads, segment_lengths, dilation_rates, head_split
    )


def _route(q: torch.Tensor, ring: RingArgs, is_causal: bool, spec: DilatedSpec) -> Plan | DilatedRingPlan:
    """A dilated `Plan` when every segment lies inside a run of the shard, else a
    `DilatedRingPlan`."""
    seg, rates = tuple(spec.segment_lengths), tuple(spec.dilation_rates)
    n = q.shape[2]
    if dilated_segments_local(seg, n, ring.layout, ring.world_size):
        return plan_for(q, seg, rates, spec.head_split)
    return _dilated_ring_plan(
        ring.world_size, ring.rank, n, ring.layout, bool(is_causal), q.shape[1], seg, rates, spec.head_split
    )


def ring_forward(q, k, v, ring: RingArgs, is_causal: bool, scale: float, spec: DilatedSpec):
    """(out, lse) of this rank's shard inside the ring custom op."""
    plan = _route(q, ring, is_causal, spec)
    if isinstance(plan, Plan):
        return dilated_forward(plan, is_causal, scale, q, k, v)
    out, lse, _ = dilated_ring_forward(plan, q, k, v, scale, ring.group_name)
    return out, lse


def ring_backward(dout, q, k, v, out, lse, ring: RingArgs, is_causal: bool, scale: float, spec: DilatedSpec):
    """(dq, dk, dv) inside the ring custom op, first gathering the remote keys/values again
    (every rank does both exchanges, in this order, so the collectives still match)."""
    plan = _route(q, ring, is_causal, spec)
    if isinstance(plan, Plan):
        return dilated_backward(plan, is_causal, scale, q, k, v, out, lse, dout)
    gathered, _ = _gather_keys(plan, k, v, ring.group_name)
    return dilated_ring_backward(plan, dout, q, k, v, out, lse, gathered, scale, ring.group_name)


def key_traffic(n_local, layout, world_size, rank, is_causal, *, segment_lengths=(), **_) -> str:
    if dilated_segments_local(tuple(segment_lengths), n_local, layout, world_size):
        return "none sent (segments inside a shard)"
    return "selected ones exchanged"


FUNCTIONS = Functions(
    static=dilated_attention,
    dynamic=dynamic_dilated_attention,
    ring_inner=ring_inner,
    ring_forward=ring_forward,
    ring_backward=ring_backward,
    key_traffic=key_traffic,
)
