"""The work list's items: every (head, pattern, segment, offset, row block) of a `Plan`.

An item is `ITEM_FIELDS` int32 values (head, pos0, rate, m, block, out_row0,
seg_start, seg_len, offset): the rows ``pos0 + i * rate`` of one segment, i in
the block, ``m`` of them selected. With the ``longnet`` split each pattern's
rows go to compact rows (`pattern_geometry`), merged afterwards; with ``groups``
an item also covers its block's rows of the other offsets (written as zeros).

A ``longnet`` plan can instead run as one softmax over its patterns' keys
(`runs_as_union`): its *union items* (`union_items`, kernels in
`worklist_union.py`) are blocks of one head's rows a fixed stride apart inside
one window, which every pattern selects all or none of.
"""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .plan import Plan

ITEM_FIELDS = 9  # head, pos0, rate, m, block, out_row0, seg_start, seg_len, offset


def pattern_geometry(plan: Plan) -> list[tuple[int, int, int, int]]:
    """(w, r, first compact row, rows per segment) of each pattern."""
    geometry: dict[int, tuple[int, int]] = {}
    for job in plan.jobs:
        full = job.parts[0]
        geometry[job.pattern] = (full.seg_len, full.rate)
    out, row = [], 0
    for i in range(plan.n_patterns):
        w, r = geometry.get(i, (max(plan.seq_len, 1), 1))
        per_seg = -(-w // r)
        out.append((w, r, row, per_seg))
        row += -(-plan.seq_len // w) * per_seg
    return out


def work_items(plan: Plan, block_m: int, block_n: int, causal: bool, compact: bool) -> torch.Tensor:
    """All work items of `plan` (int32, on the CPU): the heaviest first, then by the first
    position of their rows, then by head, so that programs running at the same time
    read neighbouring positions of every head (a position's heads are adjacent in memory)."""
    geometry = pattern_geometry(plan)
    chunks, work = [], []
    for job in plan.jobs:
        w, _, row0, per_seg = geometry[job.pattern]
        heads = torch.arange(job.h_start, job.h_stop, job.h_step)
        for p in job.parts:
            m = p.m
            # longnet: blocks of selected rows; groups: also the rows of other offsets (zero-filled)
            rows = m if compact else -(-p.seg_len // p.rate)
            n_blocks = -(-rows // block_m)
            if n_blocks == 0:
                continue
            seg_start = p.start + torch.arange(p.n_segs) * p.seg_len
            blocks = torch.arange(n_blocks)
            hh, ss, bb = torch.meshgrid(heads, seg_start, blocks, indexing="ij")
            hh, ss, bb = hh.flatten(), ss.flatten(), bb.flatten()
            pos0 = ss + p.offset
            out_row0 = row0 + (ss // w) * per_seg if compact else pos0
            const = lambda x: torch.full_like(hh, x)  # noqa: E731
            chunks.append(torch.stack(
                [hh, pos0, const(p.rate), const(m), bb, out_row0, ss, const(p.seg_len), const(p.offset)], 1
            ))
            has_rows = bb * block_m < m
            if causal:
                cost = (torch.minimum((bb + 1) * block_m, torch.tensor(m)) + block_n - 1) // block_n
            else:
                cost = torch.full_like(bb, -(-m // block_n))
            work.append(torch.where(has_rows, cost.float(), 0.01))
    if not chunks:
        return torch.zeros((0, ITEM_FIELDS), dtype=torch.int32)
    items, cost = torch.cat(chunks), torch.cat(work)
    first = items[:, 6] + items[:, 4] * block_m * items[:, 2]  # the block's first position
    return _heaviest_first(items, items[:, 0], first, cost)


def _heaviest_first(items: torch.Tensor, head: torch.Tensor, first: torch.Tensor, cost: torch.Tensor
                    ) -> torch.Tensor:
    """`items` (int32, contiguous) ordered by `cost` descending, then by their rows' `first`
    position, then by `head`."""
    order = torch.argsort(head, stable=True)
    order = order[torch.argsort(first[order], stable=True)]
    order = order[torch.argsort(cost[order], descending=True, stable=True)]
    return items[order].to(torch.int32).contiguous()


def head_rows(plan: Plan) -> int:
    """Compact rows per (batch, head) of a ``longnet`` plan's patterns."""
    return sum(-(-plan.seq_len // w) * per_seg for w, _, _, per_seg in pattern_geometry(plan))


UNION_FIELDS = 5  # head, pos0, stride, rows, block; then (key_pos0, key_rate, key_count) per pattern
# ``DILATED_WORKLIST_UNION=auto`` runs a ``longnet`` plan as one softmax where its items
# have at least this many rows (`union_rows`), except a causal forward,
# else as per-pattern rows merged by a second launch; ``on``/``off`` force either. The
# causal forward stays merged: a union item's rows span its whole window, so its causal
# mask cuts off about half of what it computes with a pattern of rate 1 (an H100 at 8k:
# 0.278 ms against 0.225 merged; non-causal 0.262 against 0.259). The backward, free of the
# merged path's fp32 atomic sums, took 0.94 ms against 1.56 (causal) and 0.97 against 1.59.
UNION_MIN_ROWS = 32
UNION_SETTING = "DILATED_WORKLIST_UNION"


def union_shape(plan: Plan) -> tuple[int, int]:
    """(window, stride) of a ``longnet`` plan's union items: windows of `window`
    positions lie inside one segment of every pattern (the gcd of the segments
    shorter than the sequence), and rows `stride` apart (the lcm of the rates)
    share every pattern's selection."""
    window, stride = plan.seq_len, 1
    for w, r, _, _ in pattern_geometry(plan):
        if w < plan.seq_len:
            window = math.gcd(window, w) if window < plan.seq_len else w
        stride = math.lcm(stride, r)
    return max(window, 1), stride


def union_rows(plan: Plan) -> int:
    """Rows of a union item's block before it is cut into blocks (per window and class)."""
    window, stride = union_shape(plan)
    return -(-window // stride)


def union_items(plan: Plan, block_m: int, causal: bool) -> torch.Tensor:
    """The union items of a ``longnet`` plan (int32, on the CPU; fields in
    `worklist_union.py`): for every head, window and class of positions modulo the
    stride, blocks of `block_m` rows; the heaviest first, then by first position,
    then by head."""
    n, heads = plan.seq_len, plan.num_heads
    window, stride = union_shape(plan)
    hh, aa, cc = torch.meshgrid(
        torch.arange(heads), torch.arange(0, n, window), torch.arange(stride), indexing="ij")
    hh, aa, cc = hh.flatten(), aa.flatten(), cc.flatten()
    pos0 = aa + cc
    rows = (torch.clamp(n - aa, max=window) - cc + stride - 1).div(stride, rounding_mode="floor").clamp(min=0)
    keep = rows > 0
    hh, pos0, rows = hh[keep], pos0[keep], rows[keep]
    n_blocks = -(-rows // block_m)
    owner = torch.repeat_interleave(torch.arange(rows.numel()), n_blocks)
    blk = torch.arange(owner.numel()) - torch.repeat_interleave(torch.cumsum(n_blocks, 0) - n_blocks, n_blocks)
    hh, pos0, rows = hh[owner], pos0[owner], rows[owner]
    first = pos0 + blk * block_m * stride
    last = pos0 + (torch.minimum((blk + 1) * block_m, rows) - 1) * stride
    columns, cost = [hh, pos0, torch.full_like(hh, stride), rows, blk], torch.zeros_like(hh)
    for w, r, _, _ in pattern_geometry(plan):
        seg_start = (pos0 // w) * w
        offset = hh % r
        selected = (pos0 - seg_start) % r == offset
        key_pos0 = seg_start + offset
        count = (torch.clamp(n - seg_start, max=w) - offset + r - 1).div(r, rounding_mode="floor")
        count = torch.where(selected, count.clamp(min=0), 0)
        columns += [key_pos0, torch.full_like(hh, r), count]
        seen = torch.minimum(count, (last - key_pos0).div(r, rounding_mode="floor") + 1) if causal else count
        cost += seen.clamp(min=0)
    return _heaviest_first(torch.stack(columns, 1), hh, first, cost)


def runs_as_union(plan: Plan, causal: bool, backward: bool) -> bool:
    """Whether the work list runs `plan`'s forward or backward as one softmax over its
    patterns' keys (``longnet`` only; ``DILATED_WORKLIST_UNION``: auto, on or off)."""
    if plan.head_split != "longnet":
        return False
    setting = os.environ.get(UNION_SETTING, "auto").lower()
    if setting not in ("auto", "on", "off"):
        raise ValueError(f"{UNION_SETTING}={setting!r}: use auto, on or off")
    if setting != "auto":
        return setting == "on"
    return (backward or not causal) and union_rows(plan) >= UNION_MIN_ROWS
