"""Process groups and sequence sharding for ring attention (docs/spec.md, "Ring attention").

A ring shards the sequence over the ranks of a process group:

- ``contiguous``: rank r holds positions ``[r*n, (r+1)*n)``, n = N / W;
- ``zigzag``: the sequence is cut into 2W chunks of N / (2W); rank r holds
  chunk r followed by chunk 2W-1-r (balances causal work).

`shard` and `unshard` cut and reassemble tensors (ids, positions, labels,
outputs) the same way `ring_attention` expects. `register_group` gives a
process group a name that a policy's ``ring: {group: <name>}`` refers to.
`ring_info` is what the compiler calls at compile time: world size, rank and
the c10d group name that goes into the graph as a plain string constant.
`check_same_on_all_ranks` is the (eager, compile-time) guard that makes a
mismatched setup fail on every rank instead of hanging in a collective.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Union

import torch
import torch.distributed as dist

LAYOUTS = ("contiguous", "zigzag")

GroupLike = Union[None, str, "dist.ProcessGroup"]

_GROUPS: dict[str, Any] = {}  # user name -> ProcessGroup (or _NON_MEMBER)
_NON_MEMBER = dist.GroupMember.NON_GROUP_MEMBER if dist.is_available() else object()


class RingInfo(NamedTuple):
    """Where this process stands in a ring's process group."""

    world_size: int  # 1 when torch.distributed is not initialised
    rank: int  # this process's rank inside the group
    group_name: str | None  # c10d group name (a plain string for graphs); None when local


def register_group(name: str, process_group: Any) -> None:
    """Give `process_group` (a ProcessGroup or a 1-D DeviceMesh) the name `name`.

    A policy rule's ``ring: {group: name}`` and ``ring_attention(group=name)``
    then use it. Call it on every rank, before compiling (on ranks outside
    the group, with what `new_group` returned there: using the name on such
    a rank is then an error naming the group). Registering a name
    again replaces the group for later compilations; graphs already compiled
    keep the group they were compiled with.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"register_group: the name must be a non-empty string, got {name!r}")
    if hasattr(process_group, "get_group") and hasattr(process_group, "ndim"):  # DeviceMesh
        if process_group.ndim != 1:
            raise ValueError(
                f"register_group({name!r}, mesh): the DeviceMesh has {process_group.ndim} "
                "dimensions; pass one dimension, e.g. mesh['cp'] or mesh.get_group(dim)"
            )
        process_group = process_group.get_group()
    if process_group is _NON_MEMBER:  # new_group() on a rank outside the group
        _GROUPS[name] = process_group
        return
    if not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(
            f"register_group({name!r}, ...): expected a torch.distributed ProcessGroup or a "
            f"1-D DeviceMesh, got {type(process_group).__name__}"
        )
    _GROUPS[name] = process_group


def registered_groups() -> dict[str, Any]:
    """A copy of the name -> ProcessGroup registry."""
    return dict(_GROUPS)


def distributed_ready() -> bool:
    """True when torch.distributed is available and a default process group exists."""
    return dist.is_available() and dist.is_initialized()


def resolve_group(group: GroupLike) -> Any:
    """The ProcessGroup that `group` stands for; None when torch.distributed is not initialised.

    `group` is None (the world group), a ProcessGroup, a name given to
    `register_group`, or a c10d group name (what `ring_info` returns).
    """
    if isinstance(group, str):
        if group in _GROUPS:
            return _GROUPS[group]
        if distributed_ready():
            try:
                return dist.distributed_c10d._resolve_process_group(group)
            except (KeyError, RuntimeError, ValueError):
                pass
        known = ", ".join(repr(n) for n in sorted(_GROUPS)) or "none"
        raise ValueError(
            f"process group {group!r} is not registered (registered: {known}); call "
            f"dilated_compile.register_group({group!r}, process_group) on every rank first"
        )
    if not distributed_ready():
        if group is not None:
            raise ValueError(
                "a process group was given but torch.distributed is not initialised; call "
                "torch.distributed.init_process_group first"
            )
        return None
    if group is None:
        return dist.group.WORLD
    if isinstance(group, dist.ProcessGroup):
        return group
    raise TypeError(
        f"group must be None, a ProcessGroup or a registered name, got {type(group).__name__}"
    )


def ring_info(group: GroupLike = None) -> RingInfo:
    """(world_size, rank, group_name) of the ring over `group`.

    World size 1 and group name None when torch.distributed is not
    initialised: a ring then runs its inner attention locally. Call it at
    compile time; pass the returned values to the graph as constants.
    """
    pg = resolve_group(group)
    if pg is None:
        return RingInfo(1, 0, None)
    rank = -1 if pg is _NON_MEMBER else dist.get_rank(pg)
    if rank < 0:
        raise ValueError(
            f"this process (global rank {dist.get_rank()}) is not a member of process group "
            f"{group!r}; only its members may run a ring over it"
        )
    return RingInfo(dist.get_world_size(pg), rank, pg.group_name)


def spans_ranks(group: GroupLike = None) -> bool:
    """Whether a ring over `group` runs over several ranks (each rank then holds a shard)."""
    return ring_info(group).world_size > 1


def check_same_on_all_ranks(value: Any, what: str, group: GroupLike = None) -> None:
    """Raise ValueError on every rank unless all ranks of `group` pass an equal `value`.

    `value` is a small picklable object (shapes, a policy digest). Uses
    all_gather_object, so every rank of the group must call it; it is meant
    for eager checks and compile time, never inside a traced graph.
    """
    world, _, _ = ring_info(group)  # raises on a rank outside the group
    if world == 1:
        return
    pg = resolve_group(group)
    values: list[Any] = [None] * world
    dist.all_gather_object(values, value, group=pg)
    if all(v == values[0] for v in values[1:]):
        return
    listing = "; ".join(f"rank {r}: {v!r}" for r, v in enumerate(values))
    differ = [r for r, v in enumerate(values) if v != values[0]]
    raise ValueError(
        f"{what} differs between ranks ({listing}); ranks {differ} differ from rank 0. "
        f"Every rank of the ring must use the same {what}."
    )


def check_layout(layout: str) -> None:
    """Raise ValueError unless `layout` is one of LAYOUTS."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r}: expected one of {', '.join(map(repr, LAYOUTS))}")


def chunks_of_rank(layout: str, rank: int, world_size: int) -> tuple[int, ...]:
    """Chunk indices rank `rank` holds, in order (W chunks contiguous, 2W zigzag)."""
    check_layout(layout)
    if layout == "contiguous":
        return (rank,)
    return (rank, 2 * world_size - 1 - rank)


def check_divisible(seq_len: int, layout: str, world_size: int, what: str = "sequence length") -> None:
    """Raise ValueError unless a global `seq_len` shards evenly in `layout` over `world_size`."""
    check_layout(layout)
    parts = world_size if layout == "contiguous" else 2 * world_size
    if seq_len % parts:
        raise ValueError(
            f"{what} {seq_len} does not shard evenly: layout {layout!r} over {world_size} ranks "
            f"needs a multiple of {parts}; pad the sequence to {-(-seq_len // parts) * parts}"
        )


def shard_positions(seq_len: int, layout: str, rank: int, world_size: int) -> torch.Tensor:
    """Global positions (int64) that rank `rank` holds of a sequence of `seq_len`."""
    check_divisible(seq_len, layout, world_size)
    pos = torch.arange(seq_len)
    n_chunks = world_size if layout == "contiguous" else 2 * world_size
    pieces = pos.chunk(n_chunks)
    return torch.cat([pieces[c] for c in chunks_of_rank(layout, rank, world_size)])


def position_list(seq_len: int, layout: str, rank: int, world_size: int) -> list[int]:
    """Global positions rank `rank` holds of a sequence of `seq_len`, as plain ints (no torch)."""
    check_divisible(seq_len, layout, world_size)
    n_chunks = world_size if layout == "contiguous" else 2 * world_size
    size = seq_len // n_chunks
    return [p for c in chunks_of_rank(layout, rank, world_size) for p in range(c * size, (c + 1) * size)]


def shard(x: torch.Tensor, dim: int, layout: str = "contiguous", group: GroupLike = None) -> torch.Tensor:
    """This rank's piece of the full tensor `x` along `dim` (ids, positions, labels...).

    Contiguous layout returns a view; zigzag a new tensor (two chunks joined).
    World size 1 (or no process group) returns `x` unchanged.
    """
    world, rank, _ = ring_info(group)
    check_layout(layout)
    if world == 1:
        return x
    dim = dim % x.dim()
    check_divisible(x.shape[dim], layout, world, what=f"length {x.shape[dim]} of dim {dim}")
    return _take_shard(x, dim, layout, world, rank)


def unshard(x: torch.Tensor, dim: int, layout: str = "contiguous", group: GroupLike = None) -> torch.Tensor:
    """The full tensor from every rank's shard `x` along `dim`: the inverse of `shard`.

    A collective: every rank of the group must call it, with equal shapes.
    Differentiable with replicated-gradient semantics (as DTensor's
    Shard -> Replicate): every rank computes the same function of the full
    tensor, so the backward just takes this rank's shard of the full
    gradient, with no communication.
    """
    world, rank, group_name = ring_info(group)
    check_layout(layout)
    if world == 1:
        return x
    dim = dim % x.dim()
    if not torch.compiler.is_compiling():
        check_same_on_all_ranks((tuple(x.shape), str(x.dtype)), "unshard input shape", group)
    return _Unshard.apply(x, dim, layout, world, rank, group_name)


def _gather_full(x: torch.Tensor, dim: int, layout: str, world: int, group_name: str) -> torch.Tensor:
    """All-gather shards along `dim` (functional collective) and put the chunks in order."""
    c10d_ops = torch.ops._c10d_functional
    moved = x.movedim(dim, 0).contiguous()
    gathered = c10d_ops.wait_tensor(c10d_ops.all_gather_into_tensor(moved, world, group_name))
    if layout == "zigzag":
        pieces = gathered.chunk(2 * world)  # rank r's chunks r, 2W-1-r sit at 2r, 2r+1
        where = {}
        for r in range(world):
            for i, c in enumerate(chunks_of_rank(layout, r, world)):
                where[c] = 2 * r + i
        gathered = torch.cat([pieces[where[c]] for c in range(2 * world)])
    return gathered.movedim(0, dim)


def _take_shard(full: torch.Tensor, dim: int, layout: str, world: int, rank: int) -> torch.Tensor:
    """Rank `rank`'s shard of `full` along `dim` (no process group needed)."""
    n_chunks = world if layout == "contiguous" else 2 * world
    size = full.shape[dim] // n_chunks
    pieces = [full.narrow(dim, c * size, size) for c in chunks_of_rank(layout, rank, world)]
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=dim)


class _Unshard(torch.autograd.Function):
    """All-gather in order; backward: this rank's shard of the (replicated) gradient."""

    @staticmethod
    def forward(ctx, x, dim: int, layout: str, world: int, rank: int, group_name: str):
        ctx.args = (dim, layout, world, rank)
        return _gather_full(x, dim, layout, world, group_name)

    @staticmethod
    def backward(ctx, grad):
        dim, layout, world, rank = ctx.args
        return _take_shard(grad, dim, layout, world, rank), None, None, None, None, None
