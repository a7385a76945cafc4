"""Where a rank's shard lies in the global sequence, as far as the lowering needs it:
checks of a shard's length and whether dilated segments stay inside a shard."""

from __future__ import annotations

from typing import Sequence

from ...sharding import check_layout


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


def dilated_segments_local(
    segment_lengths: Sequence[int], n_local: int, layout: str, world_size: int
) -> bool:
    """Whether every dilated segment lies inside one run of a shard (no communication needed)."""
    if world_size == 1:
        return True
    unit = local_segment_unit(n_local, layout, world_size)
    return all(unit % w == 0 for w in segment_lengths)
