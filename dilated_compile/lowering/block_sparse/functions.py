"""What computes block-sparse attention: the `Functions` record of its strategy.

As a ring's inner attention the pattern applies on global positions: where no
rank needs more than a shard of the others' keys, one all-to-all sends each
rank exactly the keys its queries may attend (`ring/block_exchange.py`, whose
backward inside the ring custom op redoes that exchange first); otherwise the
dense ring's rotation with block-sparse steps (`ring/block_sparse.py`).
"""

from __future__ import annotations

import torch

from ...policy.specs import BlockSparseSpec
from ..ring import dense
from ..ring.block_exchange import (
    ExchangePlan,
    exchange_backward,
    exchange_forward,
    exchange_plan,
    gather_keys,
)
from ..ring.block_sparse import make_block_sparse_plan, ring_block_sparse
from ..ring.window_exchange import WindowPlan, window_backward, window_forward, window_plan
from ..strategy import Functions, RingArgs
from .attention import block_sparse_attention
from .op import dynamic_block_sparse_attention
from .patterns import constant_pattern


def ring_inner(
    q, k, v, *, world_size, rank, group_name, layout, is_causal, scale, block_size=None, pattern=None,
) -> torch.Tensor:
    """This rank's shard of block-sparse attention over the ring (static lengths)."""
    if block_size is None or pattern is None:
        raise ValueError(
            'ring_attention(inner="block_sparse") needs block_size and pattern '
            "(or block_sparse=BlockSparseSpec(...))"
        )
    pattern = constant_pattern(pattern, block_size)
    if world_size == 1:
        return block_sparse_attention(
            q, k, v, block_size=block_size, pattern=pattern, is_causal=is_causal, scale=scale
        )
    return ring_block_sparse(
        q, k, v, world_size=world_size, rank=rank, group_name=group_name, layout=layout,
        is_causal=is_causal, scale=scale, pattern=pattern, block_size=block_size,
    )


def _plan(q: torch.Tensor, ring: RingArgs, is_causal: bool, spec: BlockSparseSpec):
    """The key-exchange plan where that sends less than the ring, else the ring's schedule."""
    layout = "contiguous" if ring.world_size == 1 else ring.layout
    return make_block_sparse_plan(
        ring.world_size, ring.rank, q.shape[2], layout, bool(is_causal), spec.pattern, spec.block_size
    )


def ring_forward(q, k, v, ring: RingArgs, is_causal: bool, scale: float, spec: BlockSparseSpec):
    """(out, lse) of this rank's shard inside the ring custom op."""
    plan = _plan(q, ring, is_causal, spec)
    if isinstance(plan, WindowPlan):
        out, lse, _ = window_forward(
            plan, q, k, v, scale, ring.group_name, spec.pattern, spec.block_size, bool(is_causal)
        )
        return out, lse
    run = exchange_forward if isinstance(plan, ExchangePlan) else dense.ring_forward
    out, lse, _ = run(plan, q, k, v, scale, ring.group_name)
    return out, lse


def ring_backward(
    dout, q, k, v, out, lse, ring: RingArgs, is_causal: bool, scale: float, spec: BlockSparseSpec
):
    """(dq, dk, dv) inside the ring custom op (the key exchange again first, see above)."""
    plan = _plan(q, ring, is_causal, spec)
    if isinstance(plan, WindowPlan):
        received = gather_keys(plan, k, v, ring.group_name)
        return window_backward(
            plan, dout, q, k, v, out, lse, received, scale, ring.group_name, spec.pattern,
            spec.block_size, bool(is_causal),
        )
    if isinstance(plan, ExchangePlan):
        received = gather_keys(plan, k, v, ring.group_name)
        return exchange_backward(plan, dout, q, k, v, out, lse, received, scale, ring.group_name)
    return dense.ring_backward(plan, dout, q, k, v, out, lse, scale, ring.group_name)


def key_traffic(n_local, layout, world_size, rank, is_causal, *, block_size=None, pattern=None, **_) -> str:
    pattern = constant_pattern(pattern, block_size)
    plan = exchange_plan(world_size, rank, n_local, layout, bool(is_causal), pattern, int(block_size))
    if plan is None:
        plan = window_plan(world_size, rank, n_local, layout, bool(is_causal), pattern, int(block_size))
    if isinstance(plan, WindowPlan):
        return f"only those within the window, exchanged ({sum(map(len, plan.needed))} received here)"
    return "only those used, exchanged" if plan is not None else "shards rotate"


FUNCTIONS = Functions(
    static=block_sparse_attention,
    dynamic=dynamic_block_sparse_attention,
    ring_inner=ring_inner,
    ring_forward=ring_forward,
    ring_backward=ring_backward,
    key_traffic=key_traffic,
)
