"""The work list's items (`lowering/dilated/worklist_items.py`) cover a dilated attention
exactly: with ``groups`` every (head, position) is written by exactly one item (as a
selected row, or as a zero of another offset), with ``longnet`` every (head, pattern,
selected position) is one item's row at its own compact row, and a ``longnet`` union
item's key runs are exactly its rows' patterns' keys. Items of equal cost run by
position, then head. No GPU or Triton needed."""

import pytest
import torch

from dilated_compile.lowering.dilated import worklist, worklist_blocks, worklist_items
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

    assert tuple(worklist_blocks.FORWARD_BLOCKS) == tuple(worklist_blocks.BACKWARD_BLOCKS) == HEAD_DIMS


def test_descriptor_setting_is_checked_and_keeps_the_rows_per_item():
    """``DILATED_WORKLIST_TMA``: a wrong value is refused with what to set; ``on`` runs
    descriptors under the interpreter with the same item blocks, ``auto`` and ``off`` do not."""
    pointer = worklist.Blocks(32, 16, 1, 1)
    with pytest.raises(ValueError, match="DILATED_WORKLIST_TMA='yes': expected auto, on or off"):
        worklist_blocks._descriptor_blocks("cpu", None, pointer, 128, False, "yes")
    assert worklist_blocks._descriptor_blocks("cpu", None, pointer, 16, False, "on") == pointer
    for setting in (None, "auto", "off"):
        assert worklist_blocks._descriptor_blocks("cpu", None, pointer, 128, False, setting) is None
    for head_dim, (warps, stages, maxnreg) in worklist_blocks.DESCRIPTOR_FORWARD_OPTIONS.items():
        assert worklist_blocks.FORWARD_BLOCKS[head_dim].num_warps == warps and stages >= 1 and maxnreg % 8 == 0


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


UNION_CASES = [
    # heads, N, segments, rates
    (4, 37, (8, 16, 32), (1, 2, 4)),  # N not a multiple of any segment
    (3, 50, (16, 64), (3, 6)),  # a segment longer than N; heads fewer than a rate
    (5, 90, (24, 48), (2, 3)),  # stride 6, windows inside a ragged segment
    (4, 70, (16, 96), (4, 1)),  # positions that no pattern selects
    (2, 64, (64,), (1,)),  # one pattern w = N, r = 1
]


@pytest.mark.parametrize("block_m", [2, 8, 64])
@pytest.mark.parametrize("case", UNION_CASES, ids=[f"H{c[0]}-N{c[1]}-r{c[3]}" for c in UNION_CASES])
def test_union_items_give_each_position_its_patterns_keys(case, block_m):
    """Every (head, position) is one union item's row, and the item's key runs are, per
    pattern, the positions of the row's own segment that the pattern selects (none where
    it does not select the row): the union the ``longnet`` softmax runs over."""
    h, n, seg, rates = case
    plan = make_plan(h, n, seg, rates, "longnet")
    items = worklist_items.union_items(plan, block_m, causal=False)
    assert items.shape[1] == worklist_items.UNION_FIELDS + 3 * len(seg)
    seen = torch.zeros(h, n, dtype=torch.int64)
    for head, pos0, stride, rows, blk, *runs in items.tolist():
        for t in range(blk * block_m, min((blk + 1) * block_m, rows)):
            pos = pos0 + t * stride
            seen[head, pos] += 1
            for (w, r), (key0, key_rate, count) in zip(zip(seg, rates), zip(runs[0::3], runs[1::3], runs[2::3])):
                start = (pos // w) * w
                keys = [p for p in range(start, min(start + w, n)) if (p - start) % r == head % r]
                want = keys if pos in keys else []
                assert list(range(key0, key0 + count * key_rate, key_rate)) == want, (head, pos, w, r)
    assert torch.equal(seen, torch.ones_like(seen)), seen


def test_union_runs_where_its_items_fill_rows(monkeypatch):
    """``auto``: the backward as one softmax where items hold 32 rows or more, the forward
    too unless causal; ``on`` and ``off`` force it; ``groups`` never."""
    monkeypatch.delenv(worklist_items.UNION_SETTING, raising=False)
    full = make_plan(16, 8192, (512, 1024, 2048, 4096), (1, 2, 4, 8), "longnet")  # 64 rows per item
    thin = make_plan(4, 37, (8, 16, 32), (1, 2, 4), "longnet")  # 2 rows
    runs = worklist_items.runs_as_union
    assert [runs(full, c, b) for c in (False, True) for b in (False, True)] == [True, True, False, True]
    assert not any(runs(thin, c, b) for c in (False, True) for b in (False, True))
    monkeypatch.setenv(worklist_items.UNION_SETTING, "on")
    assert runs(thin, True, False) and not runs(make_plan(4, 37, (8, 16), (1, 2), "groups"), False, True)
    monkeypatch.setenv(worklist_items.UNION_SETTING, "off")
    assert not runs(full, False, True)
    monkeypatch.setenv(worklist_items.UNION_SETTING, "sometimes")
    with pytest.raises(ValueError, match="auto, on or off"):
        runs(full, False, True)
