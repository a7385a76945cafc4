"""Dilated ring attention with segments that span ranks, forward and backward (docs/spec.md, "Ring attention").

Each (pattern, offset, head set) of the dilated attention (docs/spec.md, "Dilated attention")
needs, for the queries one rank holds, only the *selected* keys (positions
p with ``(p - s) % r == offset``) of the segments those queries lie in, and
with causal masking only those at or before the last selected query of the
segment on that rank. The plan (`make_dilated_plan`, from shapes alone, the
same on every rank) lists exactly these keys for every pair of ranks; one
``all_to_all_single`` per call moves them (every pair exchanges only what
the receiver uses; nothing at all when every segment lies inside a shard,
in which case `dilated/functions.py` runs `dilated_attention` locally instead).

Each rank then attends its selected queries to the gathered keys of each
head set: "same segment (and key at or before query, causal)" on global
positions. That is a set of dense blocks (`_blocks`, planned from positions
alone): per segment, its selected rows against its selected keys; with
causal masking, each run of consecutive selected rows sees every key before
the run in full and the run's own keys as a causal square. Blocks of one
shape run as one batched call of the fused kernels (`kernels.block_attention`,
cuDNN/flash on GPUs), the two calls of a run merge by log-sum-exp, and the
patterns of a head merge by log-sum-exp (``longnet``) exactly as
`dilated/compute.py` does. The backward runs the same kernels' backward with the
merged output and log-sum-exp, and one ``all_to_all_single`` sends each
key/value gradient back to the rank that owns the key.

Collectives and deadlocks (see `dense.py`): every rank issues the same two
collectives (one in the forward, one in the backward) in the same order.
Each always carries at least one element (a one-element link from rank r to
r+1: from k in the forward, from the output gradient in the backward), so
the backward one depends on the output gradient and stays in the backward
graph, and the received buffer is tied to the output, so no rank drops its
collective as dead code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from functools import lru_cache

import torch

from ...sharding import position_list
from ..common import dense_blocks
from ..common.autograd_output import returned_output
from ..common.block_kernels import accumulation_dtype
from ..dilated.plan import head_sets
from .dense import exchange, tie

c10d_ops = torch.ops._c10d_functional


@dataclass(frozen=True)
class DilatedJob:
    """One (pattern, offset, head set) on this rank: the keys it gathers."""

    h_start: int
    h_stop: int
    h_step: int
    seg_len: int  # segment length, clipped to the global length
    rate: int
    offset: int
    kpos: tuple[int, ...]  # global positions of the gathered keys, grouped by source rank
    counts: tuple[int, ...]  # how many of them come from each rank (rank order)
    own: tuple[int, ...]  # local indices of this rank's own keys among them
    # `_blocks`: (m, a, d, rows, full keys, diagonal keys) per shape; rows are local indices of
    # this rank's queries, keys index `kpos`
    blocks: tuple[tuple, ...]


@dataclass(frozen=True)
class DilatedRingPlan:
    """Everything about one rank's dilated ring that depends only on shapes and setup."""

    world_size: int
    rank: int
    n: int  # local shard length
    num_heads: int
    is_causal: bool
    qpos: tuple[int, ...]  # global positions of this rank's queries
    jobs: tuple[DilatedJob, ...]
    layers: tuple[tuple[int, ...], ...]  # job indices per head-covering layer, merged by lse
    send: tuple[tuple[tuple[int, ...], ...], ...]  # [destination][job]: local indices sent there
    exchanges: bool  # whether any rank sends keys to another

    def heads(self, j: int) -> slice:
        job = self.jobs[j]
        return slice(job.h_start, job.h_stop, job.h_step)

    def sent_keys(self) -> int:
        """Number of key positions (over all jobs) this rank sends to other ranks."""
        return sum(len(idx) for dest in self.send for idx in dest)


def _needed(positions, w: int, r: int, o: int, n_total: int, is_causal: bool) -> list[int]:
    """Global positions of the keys the queries at `positions` use in pattern (w, r, o)."""
    last: dict[int, int] = {}  # segment start -> last selected query there
    for p in positions:
        s = p - p % w
        if (p - s) % r == o:
            last[s] = max(last.get(s, -1), p)
    keys: list[int] = []
    for s in sorted(last):
        end = last[s] + 1 if is_causal else min(s + w, n_total)
        keys.extend(range(s + o, end, r))
    return keys


def _blocks(
    rows: list[int], row_pos: list[int], kpos: tuple[int, ...], seg_len: int, rate: int,
    is_causal: bool,
) -> tuple[tuple, ...]:
    """One job's attention as dense blocks (`dense_blocks.group`).

    `rows` are the local indices of the job's queries on this rank and
    `row_pos` their global positions, `kpos` those of its gathered keys;
    blocks index into `rows`' shard and into `kpos`. A block is
    rows of one segment and the keys they see: without causal masking all
    rows of the segment against all its keys; with it, each run of
    consecutive selected rows (positions ``p, p + rate, ...``) against the
    keys before the run (seen in full) and the run's own keys (a causal
    square: the same positions, in order).
    """
    key_at = {p: j for j, p in enumerate(kpos)}
    rows_by_seg: dict[int, list[tuple[int, int]]] = {}
    keys_by_seg: dict[int, list[tuple[int, int]]] = {}
    for i, p in zip(rows, row_pos):
        rows_by_seg.setdefault(p - p % seg_len, []).append((p, i))
    for j, p in enumerate(kpos):
        keys_by_seg.setdefault(p - p % seg_len, []).append((p, j))
    blocks = []
    for s, seg_rows in rows_by_seg.items():
        seg_rows.sort()
        keys = sorted(keys_by_seg.get(s, []))
        if not is_causal:
            blocks.append(([i for _, i in seg_rows], [j for _, j in keys], []))
            continue
        for run in dense_blocks.runs(seg_rows, rate):
            full = [j for p, j in keys if p < run[0][0]]
            blocks.append(([i for _, i in run], full, [key_at[p] for p, _ in run]))
    return dense_blocks.group(blocks)


@lru_cache(maxsize=64)
def _build_plan(
    world_size: int, rank: int, n: int, layout: str, is_causal: bool, num_heads: int,
    segment_lengths: tuple[int, ...], dilation_rates: tuple[int, ...], head_split: str,
) -> DilatedRingPlan:
    total = n * world_size
    positions = [position_list(total, layout, r, world_size) for r in range(world_size)]
    owner: dict[int, tuple[int, int]] = {}
    for r, pos in enumerate(positions):
        for i, p in enumerate(pos):
            owner[p] = (r, i)
    jobs, send, exchanges = [], [[] for _ in range(world_size)], False
    sets = list(head_sets(num_heads, len(segment_lengths), dilation_rates, head_split))
    for pattern, h0, h1, hs, o in sets:
        w, r = min(segment_lengths[pattern], total), dilation_rates[pattern]
        by_source: list[list[int]] = [[] for _ in range(world_size)]
        for dest in range(world_size):
            sent = []
            for p in _needed(positions[dest], w, r, o, total, is_causal):
                src, local = owner[p]
                exchanges |= src != dest
                if dest == rank:
                    by_source[src].append(p)
                if src == rank and dest != rank:
                    sent.append(local)
            send[dest].append(tuple(sent))
        kpos = tuple(p for part in by_source for p in part)
        own = tuple(owner[p][1] for p in by_source[rank])
        rows = [i for i, p in enumerate(positions[rank]) if (p % w) % r == o]
        blocks = _blocks(rows, [positions[rank][i] for i in rows], kpos, w, r, is_causal)
        jobs.append(DilatedJob(h0, h1, hs, w, r, o, kpos, tuple(map(len, by_source)), own, blocks))
    if head_split == "groups":
        layers = (tuple(range(len(jobs))),)
    else:
        layers = tuple(
            tuple(j for j, s in enumerate(sets) if s[0] == i) for i in range(len(segment_lengths))
        )
    return DilatedRingPlan(
        world_size, rank, n, num_heads, is_causal, tuple(positions[rank]), tuple(jobs),
        layers, tuple(tuple(s) for s in send), exchanges,
    )


@torch._dynamo.assume_constant_result
def _plan_fields(
    world_size: int, rank: int, n: int, layout: str, is_causal: bool, num_heads: int,
    segment_lengths: tuple[int, ...], dilation_rates: tuple[int, ...], head_split: str,
) -> tuple:
    """The plan as plain tuples: a constant to Dynamo (which then does not trace the planning)."""
    plan = _build_plan(
        world_size, rank, n, layout, is_causal, num_heads, tuple(segment_lengths),
        tuple(dilation_rates), head_split,
    )
    jobs = tuple(tuple(getattr(job, f.name) for f in fields(DilatedJob)) for job in plan.jobs)
    return tuple(jobs if f.name == "jobs" else getattr(plan, f.name) for f in fields(DilatedRingPlan))


def make_dilated_plan(
    world_size: int, rank: int, n: int, layout: str, is_causal: bool, num_heads: int,
    segment_lengths: tuple[int, ...], dilation_rates: tuple[int, ...], head_split: str,
) -> DilatedRingPlan:
    """The (cached) plan of one rank's dilated ring."""
    values = _plan_fields(
        world_size, rank, n, layout, is_causal, num_heads, segment_lengths, dilation_rates,
        head_split,
    )
    ws, rk, n_local, heads, causal, qpos, jobs, layers, send, exchanges = values
    jobs = tuple(DilatedJob(*job) for job in jobs)
    return DilatedRingPlan(ws, rk, n_local, heads, causal, qpos, jobs, layers, send, exchanges)


# --------------------------------------------------------------------------
# helpers


def _of_job(plan: DilatedRingPlan, j: int, x: torch.Tensor) -> torch.Tensor:
    return x[:, plan.heads(j)]


def _sizes(plan: DilatedRingPlan, counts_of, per_key: int) -> list[int]:
    """Element counts per rank of a buffer holding k and v rows for each job."""
    return [
        sum(2 * counts_of(r, j) * per_key * len(range(plan.num_heads)[plan.heads(j)])
            for j in range(len(plan.jobs)))
        for r in range(plan.world_size)
    ]


# --------------------------------------------------------------------------
# forward / backward


def _gather_keys(plan: DilatedRingPlan, k, v, group_name: str):
    """Per job, the gathered (B, heads_j, M_j, D) keys and values, and the received buffer."""
    b, d = k.shape[0], k.shape[-1]
    received = None
    if plan.exchanges:
        parts = []
        for dest in range(plan.world_size):
            for j, idx in enumerate(plan.send[dest]):
                if idx:
                    sel = dense_blocks.index_of(idx, k)
                    parts += [_of_job(plan, j, x).index_select(2, sel).reshape(-1) for x in (k, v)]
        in_sizes = _sizes(plan, lambda r, j: len(plan.send[r][j]), b * d)
        out_sizes = _sizes(
            plan, lambda r, j: 0 if r == plan.rank else plan.jobs[j].counts[r], b * d
        )
        received, _ = exchange(
            plan.world_size, plan.rank, parts, out_sizes, in_sizes, k.reshape(-1)[:1], group_name
        )
    pieces: list[list[list[torch.Tensor]]] = [[[], []] for _ in plan.jobs]
    offset = 0
    for src in range(plan.world_size):
        for j, job in enumerate(plan.jobs):
            c = job.counts[src]
            if not c:
                continue
            if src == plan.rank:
                sel = dense_blocks.index_of(job.own, k)
                for t, x in zip(pieces[j], (k, v)):
                    t.append(_of_job(plan, j, x).index_select(2, sel))
                continue
            heads = len(range(plan.num_heads)[plan.heads(j)])
            size = b * heads * c * d
            for t in pieces[j]:
                t.append(received[offset : offset + size].view(b, heads, c, d))
                offset += size
    gathered = []
    for j, (ks, vs) in enumerate(pieces):
        if ks:
            gathered.append((torch.cat(ks, dim=2), torch.cat(vs, dim=2)))
        else:
            empty = _of_job(plan, j, k)[:, :, :0]
            gathered.append((empty, _of_job(plan, j, v)[:, :, :0]))
    return gathered, received


def dilated_ring_forward(plan: DilatedRingPlan, q, k, v, scale: float, group_name: str):
    """(out in the accumulation dtype, lse, gathered keys/values per job, received buffer)."""
    gathered, received = _gather_keys(plan, k, v, group_name)
    acc = accumulation_dtype(q)
    out = q.new_zeros((*q.shape[:3], v.shape[-1]), dtype=acc)
    lse = q.new_full(q.shape[:3], -math.inf, dtype=acc)
    for layer, jobs in enumerate(plan.layers):  # the first layer covers every head once
        for j in jobs:
            heads = plan.heads(j)
            kj, vj = gathered[j]
            dense_blocks.attention(  # each job's rows straight into its heads of the output
                q[:, heads], kj, vj, plan.jobs[j].blocks, scale,
                into=(out[:, heads], lse[:, heads]), merge=layer > 0,
            )
    if received is not None:
        out = tie(out, [received])
    return out, lse, gathered


def dilated_ring_backward(plan: DilatedRingPlan, dout, q, k, v, out, lse, gathered, scale, group_name):
    """(dq, dk, dv) of this rank's shards, from the merged out and lse."""
    acc = accumulation_dtype(q)
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    dks, dvs = [], []
    for j, (kj, vj) in enumerate(gathered):
        heads = plan.heads(j)
        _, gk, gv = dense_blocks.attention_backward(  # dq: added into its heads in place
            dout[:, heads], q[:, heads], kj, vj, out[:, heads], lse[:, heads],
            plan.jobs[j].blocks, scale, dq=dq[:, heads],
        )
        dks.append(gk)
        dvs.append(gv)
    b, n, d = k.shape[0], plan.n, k.shape[-1]
    dk_parts, dv_parts, back = [], [], []  # (job, local indices, gradient); what goes back
    for src in range(plan.world_size):  # in the order the forward received the keys
        for j, job in enumerate(plan.jobs):
            c, start = job.counts[src], sum(job.counts[:src])
            if not c:
                continue
            gk, gv = dks[j][:, :, start : start + c], dvs[j][:, :, start : start + c]
            if src == plan.rank:
                dk_parts.append((j, job.own, gk))
                dv_parts.append((j, job.own, gv))
            else:
                back += [gk.reshape(-1), gv.reshape(-1)]
    if plan.exchanges:
        out_sizes = _sizes(plan, lambda r, j: len(plan.send[r][j]), b * d)
        in_sizes = _sizes(plan, lambda r, j: 0 if r == plan.rank else plan.jobs[j].counts[r], b * d)
        link = dout.reshape(-1)[:1].to(acc)
        got, _ = exchange(plan.world_size, plan.rank, back, out_sizes, in_sizes, link, group_name)
        offset = 0
        for dest in range(plan.world_size):
            for j, idx in enumerate(plan.send[dest]):
                if not idx:
                    continue
                heads = len(range(plan.num_heads)[plan.heads(j)])
                size = b * heads * len(idx) * d
                for parts in (dk_parts, dv_parts):
                    parts.append((j, idx, got[offset : offset + size].view(b, heads, len(idx), d)))
                    offset += size
    dk = _scatter_grads(plan, dk_parts, (b, plan.num_heads, n, d), acc, k.device)
    dv = _scatter_grads(plan, dv_parts, (b, plan.num_heads, n, v.shape[-1]), acc, k.device)
    if plan.exchanges:
        dq = tie(dq, [got])
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def _scatter_grads(plan: DilatedRingPlan, parts, shape, acc, device) -> torch.Tensor:
    """Sum of (job, local indices, (B, heads_j, c, D) gradient) parts into a (B, H, n, D) tensor."""
    total = torch.zeros(shape, dtype=acc, device=device)
    for j, idx, g in parts:
        total[:, plan.heads(j)].index_add_(2, dense_blocks.index_of(idx, g), g.to(acc))
    return total


class RingDilated(torch.autograd.Function):
    """Dilated ring attention over this rank's shards as one autograd node."""

    @staticmethod
    def forward(ctx, plan: DilatedRingPlan, scale: float, group_name: str, q, k, v):
        out, lse, gathered = dilated_ring_forward(plan, q, k, v, scale, group_name)
        ctx.plan, ctx.scale, ctx.group_name, ctx.n_jobs = plan, scale, group_name, len(gathered)
        flat = [t for pair in gathered for t in pair]
        ctx.save_for_backward(q, k, v, out, lse, *flat)
        return returned_output(out.to(q.dtype))

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, *flat = ctx.saved_tensors
        gathered = [(flat[2 * j], flat[2 * j + 1]) for j in range(ctx.n_jobs)]
        dq, dk, dv = dilated_ring_backward(
            ctx.plan, dout.contiguous(), q, k, v, out, lse, gathered, ctx.scale, ctx.group_name
        )
        return None, None, None, dq, dk, dv


def ring_dilated(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    world_size: int,
    rank: int,
    group_name: str | None,
    layout: str,
    is_causal: bool,
    scale: float,
    segment_lengths: tuple[int, ...],
    dilation_rates: tuple[int, ...],
    head_split: str,
) -> torch.Tensor:
    """Dilated ring attention of this rank's shards (segments may span ranks); no checks."""
    plan = make_dilated_plan(
        world_size, rank, q.shape[-2], layout, bool(is_causal), q.shape[1],
        tuple(segment_lengths), tuple(dilation_rates), head_split,
    )
    return RingDilated.apply(plan, float(scale), group_name or "", q, k, v)
