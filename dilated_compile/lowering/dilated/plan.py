"""The plan of a dilated attention: which (pattern, offset) parts each head
uses, and how the parts are batched into kernel calls.

Each (pattern, offset) picks, inside every segment of w positions, the
positions o, o+r, o+2r, ...: a strided view of the sequence. A part large
enough to fill a GPU, or to fill whole waves of its multiprocessors nearly
exactly, is one `block_attention` call on that view (no copy where the
strides allow); other small parts of the same length are copied into one
batched call (`compute.py` runs the plan).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property, lru_cache
from typing import Sequence

import torch

from ..common.block_kernels import choose_kernel, multiprocessors


@dataclass(frozen=True)
class Part:
    """One (pattern, offset, head range) over a run of equal segments.

    Covers positions ``[start, start + n_segs * seg_len)`` cut into `n_segs`
    segments of `seg_len`; in each, the positions ``offset + j * rate``
    (j < m) are selected, for heads ``range(h_start, h_stop, h_step)``.
    """

    pattern: int
    h_start: int
    h_stop: int
    h_step: int
    offset: int
    rate: int
    start: int
    seg_len: int
    n_segs: int

    @property
    def n_heads(self) -> int:
        return len(range(self.h_start, self.h_stop, self.h_step))

    @property
    def m(self) -> int:
        """Selected positions per segment."""
        return len(range(self.offset, self.seg_len, self.rate))


@dataclass(frozen=True)
class Job:
    """One pattern's work for one set of heads over the whole sequence."""

    pattern: int
    h_start: int
    h_stop: int
    h_step: int
    parts: tuple[Part, ...]  # full segments first, then the ragged tail (if any)


@dataclass(frozen=True)
class Plan:
    """Everything about a dilated attention call that depends only on shapes."""

    num_heads: int
    seq_len: int
    head_split: str
    n_patterns: int
    jobs: tuple[Job, ...]
    calls: tuple[tuple[Part, ...], ...]  # parts that share one kernel call

    # Derived once per plan (plans are cached by `make_plan`): the host work
    # of every call on the Triton path.
    @cached_property
    def batched(self) -> tuple[int, ...]:
        """Indices of the calls that batch several parts (their blocks are copies)."""
        return tuple(c for c, parts in enumerate(self.calls) if len(parts) > 1)

    @cached_property
    def batched_calls(self) -> tuple[tuple[Part, ...], ...]:
        """The calls of `batched`, in order."""
        return tuple(self.calls[c] for c in self.batched)

    @cached_property
    def rows_per_batch(self) -> tuple[int, ...]:
        """Rows of each call's blocks per batch element (segments x heads of its parts)."""
        return tuple(sum(p.n_segs * p.n_heads for p in parts) for parts in self.calls)


def head_sets(num_heads: int, n_patterns: int, rates: Sequence[int], head_split: str):
    """(pattern, h_start, h_stop, h_step, offset) for every head set."""
    if head_split == "groups":
        base, extra = divmod(num_heads, n_patterns)
        start = 0
        for i in range(n_patterns):
            size = base + (1 if i < extra else 0)
            if size:
                yield i, start, start + size, 1, i % rates[i]
            start += size
    else:
        for i, r in enumerate(rates):
            for o in range(min(r, num_heads)):
                yield i, o, num_heads, r, o


@lru_cache(maxsize=256)
def make_plan(
    num_heads: int,
    seq_len: int,
    segment_lengths: tuple[int, ...],
    dilation_rates: tuple[int, ...],
    head_split: str,
    small_part_tiles: int | None = None,
    wave: int = 0,
) -> Plan:
    """The parts and kernel calls of a dilated attention over these shapes.

    Each part with a selected position is one kernel call: its q/k/v blocks
    are strided views of the inputs (no copy when the strides allow it).
    """
    jobs = []
    for i, h0, h1, hs, o in head_sets(num_heads, len(segment_lengths), dilation_rates, head_split):
        w, r = min(segment_lengths[i], seq_len), dilation_rates[i]
        n_full, tail = divmod(seq_len, w)
        parts = []
        if n_full:
            parts.append(Part(i, h0, h1, hs, o, r, 0, w, n_full))
        if tail:
            parts.append(Part(i, h0, h1, hs, o, r, n_full * w, tail, 1))
        jobs.append(Job(i, h0, h1, hs, tuple(parts)))
    if small_part_tiles is None:
        small_part_tiles = SMALL_PART_TILES
    calls = _group_small_parts([p for job in jobs for p in job.parts if p.m], small_part_tiles, wave)
    return Plan(num_heads, seq_len, head_split, len(segment_lengths), tuple(jobs), calls)


# A kernel call should fill a large GPU: parts smaller than this many 128-row
# query tiles share a call with other small parts of the same length, unless
# they fill whole waves of the GPU's multiprocessors (`wave`) nearly exactly.
SMALL_PART_TILES = 4 * 132
ALL_PARTS_SMALL = 2**62
WAVE_FILL = 0.9


def _tiles(p: Part) -> int:
    return p.n_segs * p.n_heads * -(-p.m // 128)


def _own_call(p: Part, threshold: int, wave: int) -> bool:
    """Whether part `p` runs as its own kernel call on views of q/k/v (no copy):
    it has `threshold` query tiles, or more than one wave of `wave` tiles with the
    last wave at least WAVE_FILL full (then copying its blocks into a batched
    call costs more than the multiprocessors it leaves idle)."""
    tiles = _tiles(p)
    if tiles >= threshold:
        return True
    return wave > 0 and tiles > wave and tiles >= WAVE_FILL * wave * -(-tiles // wave)


def _group_small_parts(parts: list[Part], threshold: int, wave: int = 0) -> tuple[tuple[Part, ...], ...]:
    """One call per large part (its blocks are views); small parts batched by m."""
    own = [_own_call(p, threshold, wave) for p in parts]
    calls = [(p,) for p, alone in zip(parts, own) if alone]
    small: dict[int, list[Part]] = {}
    for p, alone in zip(parts, own):
        if not alone:
            small.setdefault(p.m, []).append(p)
    return tuple(calls + [tuple(group) for group in small.values()])


def plan_for(
    q: torch.Tensor, segment_lengths: tuple[int, ...], dilation_rates: tuple[int, ...], head_split: str
) -> Plan:
    """The plan of a dilated attention of (B, H, N, D) `q` (validated arguments)."""
    # Large parts get their own call on strided views only with cuDNN (the fast
    # path, checked on GPU); other kernels get dense batched blocks.
    views = choose_kernel(q) == "cudnn"
    small_tiles = SMALL_PART_TILES if views else ALL_PARTS_SMALL
    wave = multiprocessors(q.device) if views else 0
    # Under Dynamo (user code calling this function inside torch.compile) the
    # plan is built uncached: Dynamo does not trace through lru_cache cleanly.
    build = make_plan.__wrapped__ if torch.compiler.is_compiling() else make_plan
    return build(q.shape[1], q.shape[2], segment_lengths, dilation_rates, head_split, small_tiles, wave)
