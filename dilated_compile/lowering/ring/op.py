"""Ring attention for sites whose sequence length is symbolic (dynamic shapes).

The ring counterpart of `dilated/op.py` and `block_sparse/op.py`: a ring
site with a symbolic length calls the opaque custom op
``torch.ops.dilated_compile.ring_attention``. Its fake implementation only
gives the output's shape and layout (no guard on the length, one graph for
every length); its real implementation runs the eager ring lowering of
`attention.py` at the concrete local length and returns (out, lse). The
backward is a second custom op, ``ring_attention_backward``, which calls the
rings' explicit backward functions from the saved out and lse (autograd is
off inside a custom op's implementation). Each inner attention's strategy
(`lowering.registry`) gives both, as `Functions.ring_forward` /
`ring_backward` in its folder's ``functions.py``:

- ``"dense"``: `ring/dense.py`'s `ring_forward` / `ring_backward` with a
  `Schedule` (cached by `make_schedule`);
- ``"block_sparse"``: `ring/block_exchange.py`'s `exchange_forward` /
  `exchange_backward` where the key exchange sends less than the ring (its
  backward, like the dilated one below, redoes the key exchange first), else
  the dense ring's functions with a `BlockSparseSchedule` (its boxes cached
  by `ring/block_sparse.py`);
- ``"dilated"``: `dilated/compute.py`'s `dilated_forward` / `dilated_backward`
  on the shard when every segment lies inside one run of it (nothing is
  sent), else `ring/dilated.py`'s `dilated_ring_forward` /
  `dilated_ring_backward` (plans cached in `dilated/functions.py`). The
  static path saves the gathered remote keys/values for the backward; the op
  cannot save a variable number of tensors, so its backward *redoes the key
  exchange* (one more all-to-all of the selected keys/values, the size of the
  forward's) before the gradient exchange. The cost: the backward sends the
  forward's bytes once more.

Collectives run eagerly inside the op (functional collectives outside a
trace work eagerly). Every rank runs the same ops in the same order as long
as all ranks call the op for the same sites with the same lengths, so the
ring cannot deadlock: everything the op decides at run time (min_seq_len,
whether dilated segments fit in a shard, plans, schedules) depends only on
the local length and constants that are the same on every rank. The backend
checks the sites at compile time (`passes.check_rings_agree`), where the
length is a symbol; the forward op checks the lengths per call, before any
other check or exchange (`check_same_length`: one all-gather of one int64
per rank), and raises on every rank when they differ.

The ring travels as one op argument, `RingArgs.encode`'s canonical JSON of
(world_size, rank, group, layout), and the inner attention's parameters as
another, its strategy's `encode` (canonical JSON of segments/rates/head_split
for dilated; of block_size and the pattern's fields for block_sparse, a
``mask_mod`` pattern's function as its import path; ``{}`` for dense); both
are parsed once per distinct text (cached).

``min_seq_len`` (a global length: shard x world size) is decided per call.
For a ring rule the static path leaves a site whose global length is below
it as it was: the unchanged SDPA, which attends over this rank's own shard
only. The op does the same below it (ordinary attention of the local q, k,
v, no communication), so a model computes the same function whether it was
compiled with static or dynamic shapes.

Outputs are stored sequence-major like `dilated/op.py`'s, and like its ops
these run outside CUDA graphs (`RUNS_OUTSIDE_CUDA_GRAPHS`): a dilated ring
whose segments fit in a shard runs `dilated/compute.py` there, whose
combine and work-list kernels keep per-plan device tensors.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch

from ..common.block_kernels import accumulation_dtype
from ..common.checks import check_qkv
from ..common.custom_ops import (
    OP_NAMESPACE,
    RUNS_OUTSIDE_CUDA_GRAPHS,
    in_seq_major,
    lse_fake,
    register_backward_from_lse,
    seq_major_empty,
)
from ..common.view_replay import opaque_op
from ..registry import strategy
from ..strategy import RingArgs, decode_ring
from .dense import make_schedule, ring_backward, ring_forward
from .layout import check_local_shape

c10d_ops = torch.ops._c10d_functional


def check_same_length(q: torch.Tensor, ring: RingArgs) -> None:
    """Raise ValueError on every rank unless all ranks of the group pass the same local length.

    Cost: one all-gather of one int64 per rank (a functional collective, run
    eagerly like the op's others), and a device-to-host copy of the world_size
    lengths. Every rank makes it, whatever the length, so it cannot hang; with
    different lengths the ring's own exchanges would (their sizes differ).
    """
    if ring.world_size == 1:
        return
    mine = torch.tensor([q.shape[2]], dtype=torch.int64, device=q.device)
    lengths = c10d_ops.wait_tensor(
        c10d_ops.all_gather_into_tensor(mine, ring.world_size, ring.group_name)
    ).tolist()
    if all(n == lengths[0] for n in lengths):
        return
    listing = ", ".join(f"rank {r}: {n}" for r, n in enumerate(lengths))
    parts = ring.world_size if ring.layout == "contiguous" else 2 * ring.world_size
    raise ValueError(
        f"ring attention ({ring.layout} layout over {ring.world_size} ranks): the local sequence "
        f"length differs between ranks ({listing}). Every rank must pass its shard of the same "
        f"global sequence: pad the global length to a multiple of {parts} and cut it with "
        f"dilated_compile.shard(tensor, dim, layout={ring.layout!r}) on every rank"
    )


def _check(q: torch.Tensor, ring: RingArgs, inner: str) -> None:
    """Run-time checks the static path makes at compile time (the same on every rank)."""
    strategy(inner)
    check_local_shape(q.shape[2], ring.layout, ring.world_size)


def _below_min(q: torch.Tensor, world_size: int, min_seq_len: int) -> bool:
    """Whether the global length is below min_seq_len: the site runs as the static path leaves
    it, ordinary attention over this rank's shard only (see the module docstring)."""
    return q.shape[2] * world_size < min_seq_len


def _local_schedule(q: torch.Tensor, is_causal: bool):
    """A one-rank dense schedule: plain (causal) attention of the local shard, no collectives."""
    return make_schedule(1, 0, q.shape[2], "contiguous", bool(is_causal))


@opaque_op(f"{OP_NAMESPACE}::ring_attention", tags=RUNS_OUTSIDE_CUDA_GRAPHS)
def ring_attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    ring: str,
    inner: str,
    pattern: str,
    is_causal: bool,
    scale: float,
    min_seq_len: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) of this rank's shard of ring attention at the run-time length.

    `ring`: `RingArgs.encode`'s text; `inner`: a strategy's name; `pattern`: its
    parameters, as its `encode` writes them. Below `min_seq_len` (global length)
    ordinary attention of the local shard, as the static path.

    First, on more than one rank, one all-gather of one int64 per rank per call
    (`check_same_length`): ranks that pass different lengths all raise ValueError.
    """
    ring_args = decode_ring(ring)
    check_same_length(q, ring_args)
    _check(q, ring_args, inner)
    if _below_min(q, ring_args.world_size, min_seq_len):
        out, lse, _ = ring_forward(_local_schedule(q, is_causal), q, k, v, scale, "")
    else:
        inner_strategy = strategy(inner)
        out, lse = inner_strategy.functions.ring_forward(
            q, k, v, ring_args, is_causal, scale, inner_strategy.decode(pattern)
        )
    return in_seq_major(out.to(q.dtype)), in_seq_major(lse.to(accumulation_dtype(q)))


@ring_attention_op.register_fake
def _(q, k, v, ring, inner, pattern, is_causal, scale, min_seq_len):
    return seq_major_empty(q, q.shape, q.dtype), lse_fake(q)


@opaque_op(f"{OP_NAMESPACE}::ring_attention_backward", tags=RUNS_OUTSIDE_CUDA_GRAPHS)
def ring_attention_backward_op(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    ring: str,
    inner: str,
    pattern: str,
    is_causal: bool,
    scale: float,
    min_seq_len: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of `ring_attention_op` from its saved out and lse (collectives as its forward)."""
    ring_args = decode_ring(ring)
    _check(q, ring_args, inner)
    dout = dout.to(q.dtype).contiguous()
    if _below_min(q, ring_args.world_size, min_seq_len):
        grads = ring_backward(_local_schedule(q, is_causal), dout, q, k, v, out, lse, scale, "")
    else:
        inner_strategy = strategy(inner)
        grads = inner_strategy.functions.ring_backward(
            dout, q, k, v, out, lse, ring_args, is_causal, scale, inner_strategy.decode(pattern)
        )
    return tuple(in_seq_major(g.to(x.dtype)) for g, x in zip(grads, (q, k, v)))


@ring_attention_backward_op.register_fake
def _(dout, q, k, v, out, lse, ring, inner, pattern, is_causal, scale, min_seq_len):
    return tuple(seq_major_empty(x, x.shape, x.dtype) for x in (q, k, v))


register_backward_from_lse(ring_attention_op, ring_attention_backward_op)


def ring_op_args(
    world_size: int,
    rank: int,
    group_name: str | None,
    inner: str,
    layout: str,
    segment_lengths: Sequence[int] | None = None,
    dilation_rates: Sequence[int] | None = None,
    head_split: str = "groups",
    block_size: int | None = None,
    pattern: Any = None,
) -> list:
    """[ring, inner, pattern]: the ring and the inner attention's parameters as op arguments
    (validated; the inner's parameters as its strategy encodes them)."""
    inner_strategy = strategy(inner)
    parameters = inner_strategy.pick(
        {"segment_lengths": segment_lengths, "dilation_rates": dilation_rates, "head_split": head_split,
         "block_size": block_size, "pattern": pattern}
    )
    ring = RingArgs(int(world_size), int(rank), group_name or "", layout)
    return [ring.encode(), inner, inner_strategy.encode(**parameters)]


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
    """`attention.ring_attention_local` through the custom op: any local length, no guard on it.

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
    args = ring_op_args(
        world_size, rank, group_name, inner, layout, segment_lengths, dilation_rates, head_split,
        block_size, pattern,
    )
    out, _ = ring_attention_op(q, k, v, *args, bool(is_causal), float(scale), int(min_seq_len))
    return out
