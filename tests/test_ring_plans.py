"""What the rings send and compute, planned from shapes alone (no process group), docs/spec.md
"Ring attention": the dilated ring sends only the selected keys of segments that span ranks; the
block-sparse ring skips steps without active blocks, splits boxes, and exchanges only the keys
used where that sends less; the dense blocks of every plan hold each allowed (query, key) pair
exactly once; the backward's transfers (their dtype, and the attention hiding each one).
"""

from __future__ import annotations

import pytest
import torch

from dilated_compile.sharding import position_list

# ---------------------------------------------------------------------------
# what the rings send and skip (plans from shapes alone; no process group needed)


def _sent(world, n, layout, is_causal, segments, rates, head_split="groups", heads=1):
    """{(source, destination): global positions source sends}, summed over jobs."""
    from dilated_compile.lowering.ring.dilated import make_dilated_plan

    sent = {}
    for rank in range(world):
        plan = make_dilated_plan(world, rank, n, layout, is_causal, heads, segments, rates, head_split)
        mine = position_list(n * world, layout, rank, world)
        for dest, per_job in enumerate(plan.send):
            keys = sorted(mine[i] for idx in per_job for i in idx)
            if keys:
                sent[(rank, dest)] = keys
    return sent


def test_dilated_ring_sends_only_selected_keys_of_shared_segments():
    # one segment of 16 over two shards of 8, every second position
    assert _sent(2, 8, "contiguous", False, (16,), (2,)) == {(0, 1): [0, 2, 4, 6], (1, 0): [8, 10, 12, 14]}
    # causal: rank 0's queries never see rank 1's keys
    assert _sent(2, 8, "contiguous", True, (16,), (2,)) == {(0, 1): [0, 2, 4, 6]}
    # causal, rank 1's last selected query (offset 1) is 15: keys 1, 3, 5, 7 of rank 0
    assert _sent(2, 8, "contiguous", True, (16,), (2,), "longnet", 2) == {(0, 1): [0, 1, 2, 3, 4, 5, 6, 7]}
    # segments of 4 inside each shard: nothing at all
    assert _sent(2, 8, "contiguous", False, (4, 8), (1, 2)) == {}
    # segments of 8 span zigzag chunks of 4 (rank 0: 0-3, 12-15; rank 1: 4-11): selected keys only
    sent = _sent(2, 8, "zigzag", False, (8,), (4,))
    assert sent == {(0, 1): [0, 12], (1, 0): [4, 8]}, sent


@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize(
    "world,n,segments,rates",
    [(2, 8, (16,), (2,)), (3, 6, (4, 8, 18), (1, 2, 3)), (4, 5, (7, 40), (3, 5)), (2, 12, (5, 24), (2, 4))],
)
def test_dilated_ring_blocks_cover_exactly_the_allowed_pairs(world, n, segments, rates, layout, is_causal):
    """The dense blocks of every job hold each (row, key) pair the spec allows exactly once (same
    segment; key at or before the row with causal masking), nothing else, and each diagonal block
    has its rows' own positions as keys, in order (what a causal square needs)."""
    from dilated_compile.lowering.ring.dilated import make_dilated_plan

    if layout == "zigzag" and n % 2:
        pytest.skip("zigzag needs an even shard")
    for rank in range(world):
        plan = make_dilated_plan(world, rank, n, layout, is_causal, 3, segments, rates, "longnet")
        for job in plan.jobs:
            rows = {i: p for i, p in enumerate(plan.qpos) if (p % job.seg_len) % job.rate == job.offset}
            want = {
                (i, j) for i, p in rows.items() for j, kp in enumerate(job.kpos)
                if p // job.seg_len == kp // job.seg_len and (kp <= p or not is_causal)
            }
            got = []
            for m, a, d, brows, full, diag in job.blocks:
                assert len(brows) % m == 0 and len(full) == a * (len(brows) // m)
                for b in range(len(brows) // m):
                    block_rows = brows[b * m : (b + 1) * m]
                    got += [(i, j) for i in block_rows for j in full[b * a : (b + 1) * a]]
                    if d:
                        block_diag = diag[b * d : (b + 1) * d]
                        assert [job.kpos[j] for j in block_diag] == [rows[i] for i in block_rows]
                        got += [(i, j) for t, i in enumerate(block_rows) for j in block_diag[: t + 1]]
            assert len(got) == len(set(got)) and set(got) == want


def test_block_sparse_ring_skips_steps_without_active_blocks():
    from dilated_compile.lowering.block_sparse.patterns import as_pattern
    from dilated_compile.lowering.ring.block_sparse import make_block_sparse_schedule

    def boxes(world, n, layout, is_causal, pattern, block_size):
        pattern = as_pattern(pattern, block_size)
        return [make_block_sparse_schedule(world, r, n, layout, is_causal, pattern, block_size).boxes
                for r in range(world)]

    local = {"kind": "local_window", "window": 0}
    full8 = ((0, 8, 0, 8),)
    assert boxes(2, 8, "contiguous", False, local, 4) == [(full8, ()), ((), full8)]
    # blocks of 3 cross the shard edge at 8: block 2 holds positions 6, 7 | 8
    assert boxes(2, 8, "contiguous", True, local, 3) == [(full8, ()), (((0, 1, 6, 8),), full8)]
    glob = {"kind": "global_local", "global_blocks": 1, "window": 0}
    got = boxes(4, 4, "contiguous", True, glob, 4)
    full = ((0, 4, 0, 4),)
    assert got == [(full, (), (), ()), (full, full, (), ()),
                   (full, (), full, ()), (full, (), (), full)], got
    # zigzag over 8 positions, blocks of 3 (rank 0 holds 0, 1 | 6, 7; rank 1 holds 2 | 3, 4, 5):
    # across ranks only block 0 (0, 1 with 2) is shared, so the boxes are its rows and keys
    got = boxes(2, 4, "zigzag", False, local, 3)
    assert got == [(((0, 4, 0, 4),), ((0, 2, 0, 1),)), (((0, 1, 0, 2),), ((0, 4, 0, 4),))], got


def test_block_sparse_schedule_splits_boxes_only_for_mask_mod(monkeypatch):
    """Built-in patterns run as dense blocks: one box per shard pair however many pairs it
    holds (each box is its own kernel calls); a mask_mod pattern's masked boxes are split."""
    from dilated_compile.lowering.ring import block_sparse as rbs
    from dilated_compile.lowering.block_sparse.patterns import as_pattern

    monkeypatch.setattr(rbs, "MAX_BOX_PAIRS", 4)
    for pattern, most in (({"kind": "local_window", "window": 1}, 1),
                          ({"kind": "mask_mod", "function": "tests.masks:stripes"}, rbs.MAX_BOXES)):
        sched = rbs.make_block_sparse_schedule(2, 0, 32, "zigzag", True, as_pattern(pattern, 4), 4)
        sizes = [len(per_source) for per_source in sched.boxes]
        assert max(sizes) == most, (pattern, sizes)


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("pattern,block_size", [
    ({"kind": "local_window", "window": 1}, 4),
    ({"kind": "dilated", "stride": 3, "window": 0}, 2),
    ({"kind": "global_local", "global_blocks": 1, "window": 1}, 4),
    ({"kind": "mask_mod", "function": "tests.masks:stripes"}, 4),
])
def test_split_block_sparse_boxes_cover_every_allowed_pair_once(layout, is_causal, pattern, block_size):
    """Boxes split by query rows (MAX_BOX_PAIRS tiny): disjoint rows, at most MAX_BOXES per
    shard pair, narrower keys than one box where the pattern allows, and together they
    hold every allowed (query, key) pair of the pair."""
    from dilated_compile.lowering.ring import block_sparse as rbs
    from dilated_compile.lowering.block_sparse.patterns import as_pattern, evaluate_mask_mod, token_mask_mod

    world, n = 2, 32
    pat = as_pattern(pattern, block_size)
    allowed_all = evaluate_mask_mod(token_mask_mod(pat, block_size, is_causal), 1, 1,
                                    torch.arange(world * n), torch.arange(world * n))[0, 0]
    narrower = False
    for rank in range(world):
        mine = position_list(world * n, layout, rank, world)
        for source in range(world):
            theirs = position_list(world * n, layout, source, world)
            whole = rbs._pair_boxes(pat, block_size, is_causal, mine, theirs, 1 << 30)
            split = rbs._pair_boxes(pat, block_size, is_causal, mine, theirs, 4)
            assert len(whole) <= 1 and len(split) <= rbs.MAX_BOXES
            covered = torch.zeros(n, n, dtype=torch.int64)
            for q0, q1, k0, k1 in split:
                covered[q0:q1, k0:k1] += 1
            rows = torch.zeros(n, dtype=torch.int64)
            for q0, q1, _, _ in split:
                rows[q0:q1] += 1
            assert int(rows.max()) <= 1  # disjoint rows
            allowed = allowed_all[mine][:, theirs]
            assert bool((covered[allowed] == 1).all()), (rank, source, split)
            pairs = sum((q1 - q0) * (k1 - k0) for q0, q1, k0, k1 in split)
            narrower |= bool(whole) and pairs < (whole[0][1] - whole[0][0]) * (whole[0][3] - whole[0][2])
    assert narrower or pattern["kind"] == "mask_mod"


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("world,n,pattern,block_size", [
    (2, 32, {"kind": "local_window", "window": 1}, 4),
    (2, 12, {"kind": "local_window", "window": 1}, 5),  # blocks straddle shards and chunks
    (3, 12, {"kind": "dilated", "stride": 3, "window": 0}, 2),
    (4, 8, {"kind": "global_local", "global_blocks": 1, "window": 1}, 3),
])
def test_block_sparse_ring_blocks_cover_exactly_the_allowed_pairs(world, n, pattern, block_size, layout, is_causal):
    """Every box's dense blocks hold each (query, key) pair the token mask allows exactly once,
    and nothing else; each diagonal block's keys are its rows' own positions, in order."""
    from dilated_compile.lowering.block_sparse.patterns import as_pattern
    from dilated_compile.lowering.ring.block_sparse import make_block_sparse_schedule
    from dilated_compile.lowering.ring.dense import Call

    pat = as_pattern(pattern, block_size)
    q = torch.zeros(1, 1, n, 1)
    for rank in range(world):
        sched = make_block_sparse_schedule(world, rank, n, layout, is_causal, pat, block_size)
        mine = position_list(world * n, layout, rank, world)
        for source in range(world):
            theirs = position_list(world * n, layout, source, world)
            for box in sched.boxes[source]:
                call = Call(*box, False)
                allowed = sched.mask(source, call, q[:, :, box[0] : box[1]])
                want = {tuple(x) for x in allowed.nonzero().tolist()}
                got = []
                for m, a, d, rows, full, diag in sched.blocks(source, call):
                    for b in range(len(rows) // m):
                        block_rows = rows[b * m : (b + 1) * m]
                        got += [(i, j) for i in block_rows for j in full[b * a : (b + 1) * a]]
                        if d:
                            block_diag = diag[b * d : (b + 1) * d]
                            assert [theirs[box[2] + j] for j in block_diag] == [mine[box[0] + i] for i in block_rows]
                            got += [(i, j) for t, i in enumerate(block_rows) for j in block_diag[: t + 1]]
                assert len(got) == len(set(got)) and set(got) == want, (rank, source, box)


def _allowed_pairs(pattern, block_size, is_causal, qpos, kpos) -> torch.Tensor:
    """(len(qpos), len(kpos)) bool: the pairs the token mask allows, from global positions."""
    from dilated_compile.lowering.block_sparse.patterns import evaluate_mask_mod, token_mask_mod

    return evaluate_mask_mod(token_mask_mod(pattern, block_size, is_causal), 1, 1,
                             torch.tensor(qpos), torch.tensor(kpos))[0, 0]


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("world,n,pattern,block_size,is_causal", [
    (2, 32, {"kind": "local_window", "window": 1}, 4, False),
    (2, 32, {"kind": "local_window", "window": 1}, 4, True),
    (2, 12, {"kind": "local_window", "window": 1}, 5, False),  # blocks straddle shards and chunks
    (3, 24, {"kind": "local_window", "window": 1}, 5, True),
    # causal only: without causality the global rows use every key (the ring, see below)
    (3, 24, {"kind": "global_local", "global_blocks": 2, "window": 0}, 2, True),
    (4, 16, {"kind": "global_local", "global_blocks": 1, "window": 1}, 3, True),
])
def test_block_exchange_sends_exactly_the_used_keys_and_covers_every_pair(
        world, n, pattern, block_size, is_causal, layout):
    """The key-exchange plan: each rank receives from each other rank exactly the keys some of
    its queries may attend (no more: that is what makes it cheap), what a rank sends is what
    the other receives, and the dense blocks over own and received keys hold every allowed
    (query, key) pair once and nothing else."""
    from dilated_compile.lowering.block_sparse.patterns import as_pattern
    from dilated_compile.lowering.ring.block_exchange import exchange_plan

    pat = as_pattern(pattern, block_size)
    plans = [exchange_plan(world, r, n, layout, is_causal, pat, block_size) for r in range(world)]
    assert all(p is not None for p in plans), "these patterns need less than a shard from the others"
    for rank, plan in enumerate(plans):
        mine = position_list(world * n, layout, rank, world)
        for source in range(world):
            theirs = position_list(world * n, layout, source, world)
            allowed = _allowed_pairs(pat, block_size, is_causal, mine, theirs)
            if source != rank:
                used = tuple(allowed.any(dim=0).nonzero().flatten().tolist())
                assert plan.needed[source] == used == plans[source].send[rank], (rank, source)
                keys = list(plan.needed[source])
            else:
                keys = list(range(n))
            got = []
            for m, a, d, rows, full, diag in plan.groups[source]:
                for b in range(len(rows) // m):
                    block_rows = rows[b * m : (b + 1) * m]
                    got += [(i, keys[j]) for i in block_rows for j in full[b * a : (b + 1) * a]]
                    if d:
                        block_diag = diag[b * d : (b + 1) * d]
                        got += [(i, keys[j]) for t, i in enumerate(block_rows) for j in block_diag[: t + 1]]
            want = {tuple(x) for x in allowed.nonzero().tolist()}
            assert len(got) == len(set(got)) and set(got) == want, (rank, source)


def test_block_sparse_ring_exchanges_keys_only_where_that_sends_less():
    """Key exchange where no rank needs more than a shard of the others' keys; the ring where
    one does (a wide window), and always for a mask_mod pattern and on one rank."""
    from dilated_compile.lowering.block_sparse.patterns import as_pattern
    from dilated_compile.lowering.ring.block_exchange import exchange_plan

    def plan(world, pattern, block_size=4, n=32, causal=True):
        return exchange_plan(world, 0, n, "zigzag", causal, as_pattern(pattern, block_size), block_size)

    assert plan(4, {"kind": "local_window", "window": 2}) is not None
    assert plan(4, {"kind": "local_window", "window": 64}) is None  # every key of every rank
    # every query-block residue on each shard: every key block is some query block's
    assert plan(3, {"kind": "dilated", "stride": 4, "window": 0}, 2, 24, False) is None
    # global rows see every key without causality, only the keys before them with it
    assert plan(3, {"kind": "global_local", "global_blocks": 2, "window": 0}, 2, 24, False) is None
    assert plan(3, {"kind": "global_local", "global_blocks": 2, "window": 0}, 2, 24, True) is not None
    assert plan(2, {"kind": "mask_mod", "function": "tests.masks:stripes"}) is None
    assert plan(1, {"kind": "local_window", "window": 2}) is None


def _backward_graph(sched, dtype: torch.dtype, saved_shard: bool = False):
    """The traced graph of `ring_backward` of `sched` (fake tensors: shapes only, no process
    group), with rank r+1's shard handed over from the forward or not."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from dilated_compile.lowering.ring.dense import ring_backward

    b, h, d = 1, 2, 4
    args = [torch.randn(b, h, sched.n, d, dtype=dtype) for _ in range(5)] + [torch.randn(b, h, sched.n)]
    if saved_shard:
        args.append(torch.randn(2, b, h, sched.n, d, dtype=dtype))
    return make_fx(
        lambda *a: ring_backward(sched, *a[:6], 0.5, "unused", *a[6:]), tracing_mode="fake"
    )(*args).graph


def _backward_packet_bytes(sched, dtype: torch.dtype, saved_shard: bool = False) -> list[int]:
    """Bytes this rank sends in each backward transfer of `sched`, read from the traced graph."""
    graph = _backward_graph(sched, dtype, saved_shard)
    return [sum(node.args[2]) for node in graph.nodes if "all_to_all_single" in str(node.target)]


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("is_causal", [False, True])
def test_ring_backward_sends_the_first_gradient_hop_in_the_input_dtype(layout, is_causal):
    """The key/value gradient accumulator made at step 1 is one kernel call's gradient, exact in
    bf16: it travels in bf16 (for W = 2 the only gradient hop: half the bytes of float32);
    later hops carry sums, in float32."""
    from dilated_compile.lowering.ring.dense import make_schedule

    n, kv = 8, 2 * 1 * 2 * 8 * 4  # elements of the stacked key/value shard (B=1, H=2, n=8, D=4)
    bf16, f32 = 2 * kv, 4 * kv
    # W=2: step 0 sends the key/values, the last hop the accumulator (+ one link byte each)
    assert _backward_packet_bytes(make_schedule(2, 1, n, layout, is_causal), torch.bfloat16) == [bf16 + 1, bf16 + 1]
    assert _backward_packet_bytes(make_schedule(2, 1, n, layout, is_causal), torch.float32) == [f32 + 1, f32 + 1]
    # W=3: key/values at steps 0 and 1, the first accumulator at step 2, the sums home in float32
    got = _backward_packet_bytes(make_schedule(3, 1, n, layout, is_causal), torch.bfloat16)
    assert got == [bf16 + 1, bf16 + 1, bf16 + 1, f32 + 1], got
    # with rank r+1's shard kept from the forward no shard is fetched first
    assert _backward_packet_bytes(make_schedule(2, 1, n, layout, is_causal), torch.bfloat16, True) == [bf16 + 1]
    got = _backward_packet_bytes(make_schedule(3, 1, n, layout, is_causal), torch.bfloat16, True)
    assert got == [bf16 + 1, bf16 + 1, f32 + 1], got


@pytest.mark.parametrize("world", [2, 3, 4])
@pytest.mark.parametrize("saved_shard", [False, True])
def test_ring_backward_hides_its_end_transfers_behind_the_own_step(world, saved_shard):
    """With the forward's last shard kept every transfer is in flight while an attention runs
    (the own shard's backward hides the last gradient hop); without it all but the last hop
    (the own shard's backward hides the first fetch instead). And the ring runs backwards:
    rank r sends to r-1."""
    from dilated_compile.lowering.ring.dense import make_schedule

    rank = 1
    graph = _backward_graph(make_schedule(world, rank, 8, "zigzag", True), torch.bfloat16, saved_shard)
    nodes = list(graph.nodes)
    issues = [i for i, nd in enumerate(nodes) if "all_to_all_single" in str(nd.target)]
    waits = [i for i, nd in enumerate(nodes) if "wait_tensor" in str(nd.target)]
    attentions = [i for i, nd in enumerate(nodes) if "attention" in str(nd.target)]
    # steps 1..W-1 send whenever there is a shard or accumulator to pass on (none at step 1 of
    # W = 2), then the hop home, and without the kept shard a first fetch
    assert len(issues) == len(waits) == (world - 1) * (world > 2) + 1 + (not saved_shard)
    hidden = [any(issue < a < wait for a in attentions) for issue, wait in zip(issues, waits)]
    assert hidden == [True] * (len(issues) - 1) + [saved_shard], (issues, waits, attentions)
    for i in issues:  # (input, output split sizes, input split sizes, group)
        recv, send = nodes[i].args[1], nodes[i].args[2]
        assert send[(rank - 1) % world] > 0 and recv[(rank + 1) % world] > 0


def test_block_sparse_ring_backward_sends_gradients_in_float32():
    """Masked attention's gradients come in float32: every accumulator hop stays float32."""
    from dilated_compile.lowering.block_sparse.patterns import as_pattern
    from dilated_compile.lowering.ring.block_sparse import make_block_sparse_schedule

    pattern = as_pattern({"kind": "local_window", "window": 1}, 3)
    sched = make_block_sparse_schedule(2, 1, 8, "contiguous", True, pattern, 3)
    kv = 2 * 1 * 2 * 8 * 4
    assert _backward_packet_bytes(sched, torch.bfloat16) == [2 * kv + 1, 4 * kv + 1]
