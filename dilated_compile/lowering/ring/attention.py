"""Ring attention: sequence-parallel attention over a process group (docs/spec.md, "Ring attention").

``ring_attention(q, k, v, ...)`` takes this rank's shard of q, k, v, shape
``(batch, heads, n_local, head_dim)``, with the sequence sharded over the
ranks of `group` by `layout` (see `dilated_compile.sharding`). On every rank
the result (and the gradients of q, k, v) equals the single-device attention
on the full sequence restricted to that rank's positions; positions are
global, so causal masking uses global positions.

Inner attentions:

Each strategy of `lowering.registry` says how it runs as the inner attention
(`Functions.ring_inner`, in its folder's ``functions.py``):

- ``"dense"``: key/value shards rotate around the ring through functional
  collectives (`ring/dense.py`); partials merge by log-sum-exp.
- ``"dilated"``: when every segment lies inside one run of a shard
  (contiguous: ``n_local % w == 0``; zigzag: ``(n_local / 2) % w == 0``) each
  rank runs `dilated_attention` on its own shard and nothing is sent;
  otherwise one all-to-all exchanges exactly the selected keys/values each
  rank's queries use (`ring/dilated.py`), and one more sends their gradients back.
- ``"block_sparse"``: the block pattern on global positions. Where no rank
  needs more than a shard of the others' keys, one all-to-all sends each
  rank exactly the keys its queries may attend (`ring/block_exchange.py`);
  otherwise the dense ring's rotation with block-sparse steps, steps with no
  allowed pair skipped (`ring/block_sparse.py`).

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

from ...sharding import GroupLike, check_layout, check_same_on_all_ranks, ring_info
from ..block_sparse.patterns import constant_pattern
from ..common.checks import check_qkv
from ..registry import STRATEGIES, strategy
from .layout import check_local_shape

INNERS = tuple(STRATEGIES)
# What computes each inner attention, loaded here so that Dynamo, tracing a
# compiled `ring_attention`, finds plain records.
_FUNCTIONS = {name: s.functions for name, s in STRATEGIES.items()}


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
    block_size: int | None = None,
    pattern: Any = None,
) -> torch.Tensor:
    """Ring attention with the ring given as constants (what a compiled graph calls).

    `world_size`, `rank`, `group_name` come from `sharding.ring_info` at
    compile time. Only checks that need no communication are made here; the
    caller makes sure (e.g. with `check_same_on_all_ranks`) that all ranks
    agree on shapes and arguments.
    """
    check_qkv(q, k, v)
    inner_strategy = strategy(inner)
    n = q.shape[-2]
    check_local_shape(n, layout, world_size)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    if world_size > 1 and not group_name:
        raise ValueError("ring attention over more than one rank needs a process group name")
    parameters = inner_strategy.pick(
        {"segment_lengths": segment_lengths, "dilation_rates": dilation_rates, "head_split": head_split,
         "block_size": block_size, "pattern": pattern}
    )
    return _FUNCTIONS[inner].ring_inner(
        q, k, v, world_size=world_size, rank=rank, group_name=group_name, layout=layout,
        is_causal=is_causal, scale=scale, **parameters,
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
    block_size: int | None = None,
    pattern: Any = None,
    block_sparse: Any = None,
    check: bool = True,
) -> torch.Tensor:
    """Attention over a sequence sharded across the ranks of `group` (docs/spec.md, "Ring attention").

    q, k, v: this rank's shard, (batch, heads, n_local, head_dim), sharded by
    `layout` ("contiguous" or "zigzag", see `dilated_compile.shard`).
    `group`: None (world group), a ProcessGroup, or a name given to
    `register_group`. `inner`: "dense" (`is_causal`, `scale`), "dilated"
    (`segment_lengths`, `dilation_rates`, `head_split` as in
    `dilated_attention`, or `dilated=` a policy DilatedSpec) or
    "block_sparse" (`block_size`, `pattern` as in `block_sparse_attention`, or
    `block_sparse=` a policy BlockSparseSpec); lengths are global. Returns
    this rank's shard of the output; differentiable.

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
    if inner == "block_sparse" and block_sparse is not None:
        block_size, pattern = block_sparse.block_size, block_sparse.pattern
    if inner == "block_sparse" and block_size is not None and pattern is not None:
        pattern = constant_pattern(pattern, block_size)
    world_size, rank, group_name = ring_info(group)
    if check and world_size > 1 and not torch.compiler.is_compiling():
        setup = ring_setup_digest(
            q, k, v, inner=inner, layout=layout, is_causal=is_causal, scale=scale,
            segment_lengths=segment_lengths, dilation_rates=dilation_rates, head_split=head_split,
            block_size=block_size, pattern=pattern,
        )
        check_same_on_all_ranks(setup, "ring attention setup (shard shapes, dtype, arguments)", group)
    return ring_attention_local(
        q, k, v, world_size=world_size, rank=rank, group_name=group_name, inner=inner,
        layout=layout, is_causal=is_causal, scale=scale, segment_lengths=segment_lengths,
        dilation_rates=dilation_rates, head_split=head_split, block_size=block_size,
        pattern=pattern,
    )


def key_traffic(
    inner: str, n_local: int, layout: str, world_size: int, rank: int, is_causal: bool, **parameters: Any
) -> str:
    """How a ring over several ranks moves keys and values, in words for the site report
    (`parameters`: the inner attention's, as `ring_attention` takes them)."""
    return strategy(inner).functions.key_traffic(n_local, layout, world_size, rank, is_causal, **parameters)


def ring_setup_digest(q, k, v, **arguments: Any) -> tuple:
    """A small picklable summary of one rank's ring call, for `check_same_on_all_ranks`."""
    shapes = tuple(tuple(int(s) for s in t.shape) for t in (q, k, v))
    def plain(value):
        if isinstance(value, (list, tuple)):
            return tuple(value)
        if hasattr(value, "describe"):  # a BlockPattern; a callable's name ends in a process-local id
            return value.describe().split("#")[0]
        return value

    args = tuple((name, plain(value)) for name, value in sorted(arguments.items()))
    return (("q, k, v shapes", shapes), ("dtype", str(q.dtype))) + args


__all__ = [
    "INNERS",
    "ring_attention",
    "ring_attention_local",
    "ring_setup_digest",
    "key_traffic",
]
