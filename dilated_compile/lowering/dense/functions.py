"""What computes dense attention as a ring's inner attention: the `Functions` record of
its strategy. A dense site with no ring stays as it was (no static or dynamic function)."""

from __future__ import annotations

import torch

from ..ring import dense
from ..strategy import Functions, RingArgs


def ring_inner(q, k, v, *, world_size, rank, group_name, layout, is_causal, scale) -> torch.Tensor:
    """This rank's shard of dense attention over the ring (static lengths)."""
    return dense.ring_dense(
        q, k, v, world_size=world_size, rank=rank, group_name=group_name,
        layout=layout, is_causal=is_causal, scale=scale,
    )


def _schedule(q: torch.Tensor, ring: RingArgs, is_causal: bool) -> dense.Schedule:
    # one rank holds the whole sequence, in order, whatever the layout
    layout = "contiguous" if ring.world_size == 1 else ring.layout
    return dense.make_schedule(ring.world_size, ring.rank, q.shape[2], layout, bool(is_causal))


def ring_forward(q, k, v, ring: RingArgs, is_causal: bool, scale: float, spec: None):
    """(out, lse) of this rank's shard inside the ring custom op."""
    out, lse, _ = dense.ring_forward(_schedule(q, ring, is_causal), q, k, v, scale, ring.group_name)
    return out, lse


def ring_backward(dout, q, k, v, out, lse, ring: RingArgs, is_causal: bool, scale: float, spec: None):
    """(dq, dk, dv) inside the ring custom op."""
    return dense.ring_backward(_schedule(q, ring, is_causal), dout, q, k, v, out, lse, scale, ring.group_name)


def key_traffic(n_local, layout, world_size, rank, is_causal, **_) -> str:
    return "shards rotate"


FUNCTIONS = Functions(
    static=None,
    dynamic=None,
    ring_inner=ring_inner,
    ring_forward=ring_forward,
    ring_backward=ring_backward,
    key_traffic=key_traffic,
)
