"""The work list's items (`lowering/dilated/worklist_items.py`) cover a dilated attention
exactly: with ``groups`` every (head, position) is written by exactly one item (as a
selected row, or as a zero of another offset), with ``longnet`` every (head, pattern,
selected position) is one item's row at its own compact row. Items of equal cost run
by position, then head. No GPU or Triton needed."""

import pytest
import torch

from dilated_compile.lowering.dilated import worklist, worklist_items
from dilated_compile.lowering.dilated.plan import make_plan

CASES = [
    # heads, N, segments, rates, head_split
    (5, 40, (8, 16), (1, 2), "groups"),
    (7, 33, (8, 16), (2, 5), "groups"),
    (3, 9, (16, 32), (1, 2), "groups"),
    (2, 70, (8, 16, 32), (1, 2, 4), "groups"),  # a group without heads
    (4, 37, (8, 16, 32), (1, 2, 4), "longnet"),
    (3, 50, (16, 64), (3, 6), "longnet"),
]


@pytest.mark.parametrize("block_m", [2, 4, 32])
@pytest.mark.parametrize("case", CASES, ids=[f"{c[4]}-H{c[0]}-N{c[1]}" for c in CASES])
def test_items_cover_every_row_once(case, block_m):
    h, n, seg, rates, split = case
    plan = make_plan(h, n, seg, rates, split)
    blocks = worklist.Blocks(block_m, min(block_m, 2), 1, 1)
    wl = worklist.work_list(plan, blocks, True, torch.device("cpu"))
    geometry = worklist_items.pattern_geometry(plan)
    written = torch.zeros(h, n, dtype=torch.int64)  # groups: writes per (head, position)
    compact = {}  # longnet: (head, pattern, position) -> compact row
    for head, pos0, rate, m, blk, out_row0, seg_start, seg_len, offset in wl.items.tolist():
        rows = range(blk * block_m, (blk + 1) * block_m)
        if split == "groups":
            for other in range(rate):
                for i in rows:
                    if other + i * rate < seg_len and (other != offset or i < m):
                        written[head, seg_start + other + i * rate] += 1
        else:
            pattern = next(p for p, (w, r, row0, per) in enumerate(geometry)
                           if r == rate and (out_row0 - row0) % per == 0 and head % r == offset
                           and out_row0 == row0 + (seg_start // w) * per)
            for i in rows:
                if i < m:
                    key = (head, pattern, pos0 + i * rate)
                    assert key not in compact, key
                    compact[key] = out_row0 + i
    if split == "groups":
        assert torch.equal(written, torch.ones_like(written)), written
        return
    want = set()
    for head in range(h):
        for p, (w, r, row0, per) in enumerate(geometry):
            for pos in range(n):
                s = pos // w
                if (pos - s * w) % r == head % r:
                    want.add((head, p, pos))
                    assert compact.get((head, p, pos)) == row0 + s * per + (pos - s * w) // r
    assert set(compact) == want


def test_block_tables_cover_the_head_dims_the_choice_allows():
    from dilated_compile.lowering.dilated.kernel_choice import HEAD_DIMS

    assert tuple(worklist.FORWARD_BLOCKS) == tuple(worklist.BACKWARD_BLOCKS) == HEAD_DIMS


@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("case", CASES, ids=[f"{c[4]}-H{c[0]}-N{c[1]}" for c in CASES])
def test_items_run_heaviest_first_then_by_position_then_head(case, is_causal):
    """Items of equal cost run in the order of their rows' first position, then of their
    head, so that programs running together read neighbouring positions of every head."""
    h, n, seg, rates, split = case
    plan = make_plan(h, n, seg, rates, split)
    block_m, block_n = 4, 2
    items = worklist_items.work_items(plan, block_m, block_n, is_causal, split == "longnet")
    keys = []
    for head, pos0, rate, m, blk, out_row0, seg_start, seg_len, offset in items.tolist():
        if blk * block_m >= m:
            cost = 0.01  # only rows of other offsets (zeros)
        elif is_causal:
            cost = -(-min((blk + 1) * block_m, m) // block_n)
        else:
            cost = -(-m // block_n)
        keys.append((-cost, seg_start + blk * block_m * rate, head))
    assert keys == sorted(keys)
    assert len(set(map(tuple, items.tolist()))) == len(keys)  # no item twice
