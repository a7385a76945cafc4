"""Ring attention: sequence-parallel attention over a process group (SPEC section 5).

``ring_attention(q, k, v, ...)`` takes this rank's shard of q, k, v, shape
``(batch, heads, n_local, head_dim)``, with the sequence sharded over the
ranks of `group` by `layout` (see `dilated_compile.sharding`). On every rank
the result (and the gradients of q, k, v) equals the single-device attention
on the full sequence restricted to that rank's positions; positions are
global, so causal masking uses global positions.

Inner attentions:

- ``"dense"``: key/value shards rotate around the ring through functional
  collectives (`ring_dense`); partials merge by log-sum-exp.
- ``"dilated"``: supported when every segment lies inside one shard
  (contiguous: ``n_local % w == 0``; zigzag: ``(n_local / 2) % w == 0``); each
  rank then runs `dilated_attention` on its own shard and nothing is sent.
  Longer segments raise ValueError naming the segment and the shard length.
- ``"block_sparse"``: not implemented yet (NotImplementedError).

World size 1 or no initialised process group: the inner attention runs
locally, without collectives.

Two entry points:

- `ring_attention` (user-facing, eager or under torch.compile): resolves the
  group, and in eager mode first checks with one small all_gather_object
  that every rank passes the same shapes and arguments, so a mismatch fails
  on every rank instead of hanging in a collective.
- `ring_attention_local` (what a rewritten graph calls): every argument is a
  plain constant computed at compile time (`sharding.ring_info`); it does no
  process-group queries and no checks that need communication.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch

from ..sharding import (
    GroupLike,
    LAYOUTS,
    check_layout,
    check_same_on_all_ranks,
    ring_info,
)
from .dilated import check_dilated_args, check_qkv, dilated_attention
from .ring_dense import ring_dense

INNERS = ("dense", "dilated", "block_sparse")


def _dilated_params(dilated: Any, segment_lengths, dilation_rates, head_split):
    """(segments, rates, head_split) from a DilatedSpec-like object or the loose arguments."""
    if dilated is not None:
        return tuple(dilated.segment_lengths), tuple(dilated.dilation_rates), dilated.head_split
    if segment_lengths is None or dilation_rates is None:
        raise ValueError(
            'ring_attention(inner="dilated") needs segment_lengths and dilation_rates '
            "(or dilated=DilatedSpec(...))"
        )
    return tuple(segment_lengths), tuple(dilation_rates), head_split


def check_local_shape(n_local: int, layout: str, world_size: int) -> None:
    """Raise ValueError if a shard of `n_local` positions cannot be a shard in `layout`."""
    check_layout(layout)
    if n_local < 1:
        raise ValueError(f"ring attention needs at least one position per rank, got {n_local}")
    if layout == "zigzag" and world_size > 1 and n_local % 2:
        raise ValueError(
            f"zigzag layout: the local shard has {n_local} positions, which is odd; each rank "
            f"holds two equal chunks, so the global sequence length must be a multiple of "
            f"2 * world_size = {2 * world_size} (pad it, or use layout='contiguous')"
        )


def local_segment_unit(n_local: int, layout: str, world_size: int) -> int:
    """Length of the runs of consecutive global positions in a shard (the shard or a chunk)."""
    return n_local // 2 if layout == "zigzag" and world_size > 1 else n_local


def check_dilated_local(
    segment_lengths: Sequence[int], n_local: int, layout: str, world_size: int
) -> None:
    """Raise ValueError unless every dilated segment lies inside one run of a shard."""
    if world_size == 1:
        return
    unit = local_segment_unit(n_local, layout, world_size)
    what = "shard" if layout == "contiguous" else "zigzag chunk"
    for w in segment_lengths:
        if unit % w:
            raise ValueError(
                f"ring attention with inner 'dilated': segment length {w} does not divide the "
                f"{what} length {unit} (global length {n_local * world_size} over {world_size} "
                f"ranks, layout {layout!r}), so its segments would span ranks; segments longer "
                "than a shard are not supported yet. Use segment lengths that divide "
                f"{unit}, or fewer ranks"
            )


def ring_attention_local(
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
) -> torch.Tensor:
    """Ring attention with the ring given as constants (what a compiled graph calls).

    `world_size`, `rank`, `group_name` come from `sharding.ring_info` at
    compile time. Only checks that need no communication are made here; the
    caller makes sure (e.g. with `check_same_on_all_ranks`) that all ranks
    agree on shapes and arguments.
    """
    check_qkv(q, k, v)
    if inner not in INNERS:
        raise ValueError(f"inner={inner!r}: expected one of {', '.join(map(repr, INNERS))}")
    n = q.shape[-2]
    check_local_shape(n, layout, world_size)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    if world_size > 1 and not group_name:
        raise ValueError("ring attention over more than one rank needs a process group name")
    if inner == "block_sparse":
        raise NotImplementedError(
            "ring attention with inner 'block_sparse' is not implemented yet; use inner "
            "'dense' or 'dilated' in the ring rule, or drop `ring:` for this rule"
        )
    if inner == "dilated":
        seg, rates = check_dilated_args(segment_lengths or (), dilation_rates or (), head_split)
        check_dilated_local(seg, n, layout, world_size)
        return dilated_attention(
            q, k, v, seg, rates, head_split=head_split, is_causal=is_causal, scale=scale
        )
    return ring_dense(
        q, k, v, world_size=world_size, rank=rank, group_name=group_name,
        layout=layout, is_causal=is_causal, scale=scale,
    )


def ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    inner: str = "dense",
    layout: str = "contiguous",
    group: GroupLike = None,
    is_causal: bool = False,
    scale: float | None = None,
    segment_lengths: Sequence[int] | None = None,
    dilation_rates: Sequence[int] | None = None,
    head_split: str = "groups",
    dilated: Any = None,
    check: bool = True,
) -> torch.Tensor:
    """Attention over a sequence sharded across the ranks of `group` (SPEC section 5).

    q, k, v: this rank's shard, (batch, heads, n_local, head_dim), sharded by
    `layout` ("contiguous" or "zigzag", see `dilated_compile.shard`).
    `group`: None (world group), a ProcessGroup, or a name given to
    `register_group`. `inner`: "dense" (`is_causal`, `scale`) or "dilated"
    (`segment_lengths`, `dilation_rates`, `head_split` as in
    `dilated_attention`, or `dilated=` a policy DilatedSpec; lengths are
    global). Returns this rank's shard of the output; differentiable.

    In eager mode with `check=True`, every call first verifies (one small
    all_gather_object) that all ranks pass the same shapes and arguments, and
    raises ValueError on every rank if not. Under torch.compile the check is
    skipped (do it at compile time).
    """
    check_layout(layout)
    if inner == "dilated":
        segment_lengths, dilation_rates, head_split = _dilated_params(
            dilated, segment_lengths, dilation_rates, head_split
        )
    world_size, rank, group_name = ring_info(group)
    if check and world_size > 1 and not torch.compiler.is_compiling():
        setup = ring_setup_digest(
            q, k, v, inner=inner, layout=layout, is_causal=is_causal, scale=scale,
            segment_lengths=segment_lengths, dilation_rates=dilation_rates, head_split=head_split,
        )
        check_same_on_all_ranks(setup, "ring attention setup (shard shapes, dtype, arguments)", group)
    return ring_attention_local(
        q, k, v, world_size=world_size, rank=rank, group_name=group_name, inner=inner,
        layout=layout, is_causal=is_causal, scale=scale, segment_lengths=segment_lengths,
        dilation_rates=dilation_rates, head_split=head_split,
    )


def ring_setup_digest(q, k, v, **arguments: Any) -> tuple:
    """A small picklable summary of one rank's ring call, for `check_same_on_all_ranks`."""
    shapes = tuple(tuple(int(s) for s in t.shape) for t in (q, k, v))
    args = tuple(
        (name, tuple(value) if isinstance(value, (list, tuple)) else value)
        for name, value in sorted(arguments.items())
    )
    return (("q, k, v shapes", shapes), ("dtype", str(q.dtype))) + args


__all__ = [
    "INNERS",
    "LAYOUTS",
    "ring_attention",
    "ring_attention_local",
    "ring_setup_digest",
    "check_dilated_local",
    "check_local_shape",
]
