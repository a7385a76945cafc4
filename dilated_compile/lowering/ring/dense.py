"""Dense ring attention, forward and backward (docs/spec.md, "Ring attention").

Each rank holds one shard of q, k, v (``(batch, heads, n, head_dim)``). At
step s = 0..W-1 rank r holds the key/value shard of rank ``(r - s) mod W``:
shards move one rank along the ring per step (rank r sends to r+1) through
functional collectives (``_c10d_functional.all_to_all_single`` +
``wait_tensor``), so a traced graph contains them and Inductor can overlap
each transfer with the attention of the step it is issued in (the transfer
for step s+1 is issued before step s computes).

The attention of this rank's queries with one shard is one `block_attention`
call (a `Call`, fixed by layout, causality and the two ranks; none where
causality masks everything); partials merge by log-sum-exp.

The backward runs the ring the other way round (rank r sends to r-1): at
backward step s = 1..W-1 rank r holds the shard of rank ``(r + s) mod W``,
starting from the shard the forward ended with (rank r+1's, saved), and
its own shard comes last, while the last gradient transfer is in flight: so
no transfer waits for compute at either end (the forward's order would
leave the last gradient hop exposed after the last step). Each call's
backward uses the *merged* output and log-sum-exp. Key/value gradients
travel with the shards, as in ring-flash-attention: the packet a rank sends
at step s holds the key/values for step s+1 and the gradient accumulator of
the shard it worked on at step s-1 (both as bytes of one buffer). An
accumulator's first hop carries one kernel call's gradient, exact in the
inputs' dtype, and travels in it (half the bytes of float32 for bf16);
later hops carry sums, in the accumulation dtype. A rank keeps the gradient
of its own shard from its own queries, so an accumulator starts at step 1
on the previous rank and is back at its owner after W-1 hops (for W = 2:
one transfer, during the own step). Without the saved shard (the dynamic
path's custom op cannot hand it over) the own step comes first instead,
while rank r+1's shard arrives.

Why one packet per step, and why every transfer carries real data: each
rank's graph differs (ranks skip different work), and graph passes treat
collectives as ordinary ops. A collective whose result a rank does not use
is removed as dead code by AOTAutograd's partitioner, one that depends only
on forward inputs may be moved from the backward graph to the forward one,
identical ones are merged by CSE, and independent ones may be reordered by
Inductor's memory-planning sort - on some ranks and not others, which
deadlocks the ring. So every collective here feeds the next one through
real data (a strict chain, so any topological order keeps their order),
the backward's first one depends on the output gradient, and the last
received tensor is tied to the result (`tie`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F

from ..common.autograd_output import returned_output
from ..common.block_kernels import accumulation_dtype, block_attention, block_attention_backward
from ..common.merge import merge_by_lse

c10d_ops = torch.ops._c10d_functional


@dataclass(frozen=True)
class Call:
    """One block attention: query rows [q0, q1) with key/value rows [k0, k1) of a shard."""

    q0: int
    q1: int
    k0: int
    k1: int
    causal: bool


@dataclass(frozen=True)
class Schedule:
    """Everything about one rank's dense ring that depends only on shapes and setup."""

    world_size: int
    rank: int
    n: int  # local shard length
    layout: str
    is_causal: bool

    # whether `attend_backward` returns gradients in the inputs' dtype (the fused kernels do)
    gradients_in_input_dtype = True

    def source(self, step: int, rank: int | None = None) -> int:
        """Whose key/value shard `rank` (default: this one) holds at forward `step`."""
        r = self.rank if rank is None else rank
        return (r - step) % self.world_size

    def backward_source(self, step: int, rank: int | None = None) -> int:
        """Whose key/value shard `rank` (default: this one) holds at backward `step` (reversed)."""
        r = self.rank if rank is None else rank
        return (r + step) % self.world_size

    def calls(self, rank: int, source: int) -> tuple[Call, ...]:
        """The block attentions of `rank`'s queries with `source`'s keys and values."""
        return pair_calls(self.layout, self.is_causal, self.n, rank, source)

    def first_accumulator_dtype(self, kv_dtype: torch.dtype, acc_dtype: torch.dtype) -> torch.dtype:
        """dtype of the key/value gradient accumulator every rank sends first (made at step 1).

        `kv_dtype` where on every rank that accumulator is at most one call's gradient in the
        inputs' dtype: it then travels exactly, in half the bytes of float32 (for W = 2 it is
        the only gradient hop). Otherwise `acc_dtype`. The same on every rank (packet sizes).
        """
        if self.world_size < 2 or not self.gradients_in_input_dtype:
            return acc_dtype
        one_call = all(
            len(self.calls(r, self.backward_source(1, r))) <= 1 for r in range(self.world_size)
        )
        return kv_dtype if one_call else acc_dtype

    def attend(self, source: int, c: Call, q, k, v, scale: float):
        """(out, lse) of one call on its query rows and key/value rows."""
        return block_attention(q, k, v, is_causal=c.causal, scale=scale)

    def attend_backward(self, source: int, c: Call, dout, q, k, v, out, lse, scale: float):
        """(dq, dk, dv) of one call, given the merged out and lse of its rows."""
        return block_attention_backward(dout, q, k, v, out, lse, is_causal=c.causal, scale=scale)


def pair_calls(layout: str, is_causal: bool, n: int, rank: int, source: int) -> tuple[Call, ...]:
    """Calls of rank `rank`'s n queries against rank `source`'s n keys (global-position causal)."""
    if not is_causal:
        return (Call(0, n, 0, n, False),)
    if source == rank:  # each layout keeps a rank's positions increasing
        return (Call(0, n, 0, n, True),)
    if layout == "contiguous":
        return (Call(0, n, 0, n, False),) if source < rank else ()
    half = n // 2  # zigzag: chunks (rank, 2W-1-rank); see module docstring of attention.py
    if source < rank:  # every query sees the source's first chunk, none its second
        return (Call(0, n, 0, half, False),)
    return (Call(half, n, 0, n, False),)  # only the second query chunk sees the source


@lru_cache(maxsize=256)
def make_schedule(world_size: int, rank: int, n: int, layout: str, is_causal: bool) -> Schedule:
    """The (cached) schedule of one rank's ring."""
    return Schedule(world_size, rank, n, layout, is_causal)


# --------------------------------------------------------------------------
# collectives


def shift(
    x: torch.Tensor, world_size: int, rank: int, group_name: str, direction: int = 1
) -> torch.Tensor:
    """Issue: send `x` to rank+direction, receive the same-shaped tensor from rank-direction
    (not yet waited)."""
    flat = x.reshape(-1)
    send = [0] * world_size
    recv = [0] * world_size
    send[(rank + direction) % world_size] = flat.numel()
    recv[(rank - direction) % world_size] = flat.numel()
    return c10d_ops.all_to_all_single(flat, recv, send, group_name)


def wait(t: torch.Tensor) -> torch.Tensor:
    """The received tensor, once the collective that produces it is done."""
    return c10d_ops.wait_tensor(t)


def tie(x: torch.Tensor, others: list[torch.Tensor]) -> torch.Tensor:
    """`x` with its value unchanged but a data dependency on each of `others`.

    Adds the sum of an empty slice (0, whatever the data, NaN included).
    Keeps a received tensor that a rank does not otherwise use from being
    removed as dead code, and keeps a backward collective in the backward graph.
    """
    for t in others:
        x = x + t.reshape(-1)[:0].sum().to(x.dtype)
    return x


def exchange(
    world_size: int, rank: int, parts: list[torch.Tensor], out_sizes: list[int],
    in_sizes: list[int], link: torch.Tensor, group_name: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """All-to-all of flat `parts` (grouped by destination, element counts `in_sizes`; receiving
    `out_sizes` by source) plus a one-element link to rank+1, so that every rank's collective
    carries data and depends on `link`; returns (received data without the link, the received
    link)."""
    w, r = world_size, rank
    nxt, prv = (r + 1) % w, (r - 1) % w
    send_sizes, recv_sizes = list(in_sizes), list(out_sizes)
    send_sizes[nxt] += 1
    recv_sizes[prv] += 1
    # the link goes at the end of the block for rank+1
    cut = sum(in_sizes[: nxt + 1])
    flat = torch.cat(parts) if parts else link[:0]
    buf = torch.cat([flat[:cut], link.reshape(1).to(flat.dtype), flat[cut:]])
    got = wait(c10d_ops.all_to_all_single(buf, recv_sizes, send_sizes, group_name))
    at = sum(recv_sizes[: prv + 1]) - 1
    return torch.cat([got[:at], got[at + 1 :]]), got[at : at + 1]


def pack(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Tensors of any dtypes as one flat uint8 buffer (widest dtype first keeps views aligned)."""
    flat = [t.contiguous().reshape(-1).view(torch.uint8) for t in tensors]
    return flat[0] if len(flat) == 1 else torch.cat(flat)


def unpack(buf: torch.Tensor, specs: list[tuple[torch.Size, torch.dtype]]) -> list[torch.Tensor]:
    """Inverse of `pack`: one tensor per (shape, dtype) in `specs`."""
    out, offset = [], 0
    for shape, dtype in specs:
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        out.append(buf[offset : offset + nbytes].view(dtype).view(shape))
        offset += nbytes
    return out


# --------------------------------------------------------------------------
# forward / backward


def _pad_rows(t: torch.Tensor, lo: int, hi: int, n: int, value: float) -> torch.Tensor:
    """(..., hi-lo, X) or (..., hi-lo) rows placed at [lo, hi) of n rows, the rest `value`."""
    if lo == 0 and hi == n:
        return t
    if t.dim() == 3:  # lse (B, H, rows)
        return F.pad(t, (lo, n - hi), value=value)
    return F.pad(t, (0, 0, lo, n - hi), value=value)


def ring_forward(sched: Schedule, q, k, v, scale: float, group_name: str):
    """(out in q's dtype, lse in the accumulation dtype, the last key/value shard received:
    rank r+1's, stacked; this rank's own for W = 1) of this rank's queries."""
    w, r, n, acc = sched.world_size, sched.rank, sched.n, accumulation_dtype(q)
    kv = torch.stack([k, v])
    out = lse = None
    for step in range(w):
        pending = shift(kv, w, r, group_name) if step + 1 < w else None
        source = sched.source(step)
        for c in sched.calls(r, source):
            res_out, res_lse = sched.attend(
                source, c, q[:, :, c.q0 : c.q1], kv[0, :, :, c.k0 : c.k1], kv[1, :, :, c.k0 : c.k1],
                scale,
            )
            o = _pad_rows(res_out.to(acc), c.q0, c.q1, n, 0.0)
            l = _pad_rows(res_lse.to(acc), c.q0, c.q1, n, -math.inf)
            out, lse = (o, l) if out is None else merge_by_lse([out, o], [lse, l])
        if pending is not None:
            kv = wait(pending).view(kv.shape)
    if w > 1:  # the last shard received may be one this rank does not attend to
        out = tie(out, [kv])
    return out.to(q.dtype), lse, kv


def _step_backward(sched: Schedule, source: int, dout, q, kv, out, lse, scale: float):
    """(dq over all n rows or None, key/value gradient over all n rows or None) of this rank's
    queries with `source`'s shard `kv`.

    dq is in the accumulation dtype; the key/value gradient is in the kernel's dtype when the
    step is one call (exact; see `Schedule.first_accumulator_dtype`), else summed in the
    accumulation dtype.
    """
    n, acc = sched.n, accumulation_dtype(q)
    dq = dkv = None
    calls = sched.calls(sched.rank, source)
    for c in calls:
        rows = slice(c.q0, c.q1)
        gq, gk, gv = sched.attend_backward(
            source, c, dout[:, :, rows], q[:, :, rows], kv[0, :, :, c.k0 : c.k1],
            kv[1, :, :, c.k0 : c.k1], out[:, :, rows], lse[:, :, rows], scale,
        )
        gq = _pad_rows(gq.to(acc), c.q0, c.q1, n, 0.0)
        g = torch.stack([gk, gv]) if len(calls) == 1 else torch.stack([gk.to(acc), gv.to(acc)])
        g = _pad_rows(g, c.k0, c.k1, n, 0.0)
        dq = gq if dq is None else dq + gq
        dkv = g if dkv is None else dkv + g
    return dq, dkv


def _token(t: torch.Tensor) -> torch.Tensor:
    """One byte of `t`: sent along in a packet so the packet depends on `t` (the chain)."""
    # A converted copy, not a dtype view: a one-element slice may get any stride under Inductor,
    # and a dtype view needs unit stride.
    return (t.reshape(-1)[:1] != 0).to(torch.uint8)


def _add(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    """a + b, either of which may be None (all-zero)."""
    return b if a is None else a if b is None else a + b


def ring_backward(
    sched: Schedule, dout, q, k, v, out, lse, scale: float, group_name: str,
    kv_next: torch.Tensor | None = None,
):
    """(dq, dk, dv) of this rank's shards, given the merged out and lse.

    The ring runs reversed (see the module docstring). `kv_next`: rank r+1's
    stacked key/value shard, the last one `ring_forward` received; with it
    the own step comes last and hides the last gradient transfer, without it
    the own step comes first and hides the transfer that fetches that shard.
    Every packet ends with one byte of the previous packet received (the
    first with one byte of `dout`): the chain that orders the collectives
    and keeps them in the backward graph (see the module docstring).
    """
    w, r = sched.world_size, sched.rank
    own_kv = torch.stack([k, v])
    acc_spec = (own_kv.shape, accumulation_dtype(q))
    first_spec = (own_kv.shape, sched.first_accumulator_dtype(own_kv.dtype, acc_spec[1]))
    link = _token(dout.contiguous())

    def send(parts: list[torch.Tensor]) -> torch.Tensor:
        return shift(pack(parts + [link]), w, r, group_name, direction=-1)

    def own_step():
        return _step_backward(sched, r, dout, q, own_kv, out, lse, scale)

    dq = own = None  # own: gradient of this rank's own shard from its own queries: stays here
    own_first = w == 1 or kv_next is None
    kv = own_kv if w == 1 else kv_next
    if own_first:
        pending = send([own_kv]) if w > 1 else None  # fetches rank r+1's shard meanwhile
        dq, own = own_step()
        if pending is not None:
            buf = wait(pending)
            kv, link = unpack(buf, [(own_kv.shape, own_kv.dtype)])[0], buf[-1:]
    acc = None  # gradient of the shard this rank worked on at the previous step
    for step in range(1, w):
        sends_acc, sends_kv = acc is not None, step + 1 < w
        # an accumulator arrives in the dtype this rank's own one has now: every rank makes it alike
        specs = ([(own_kv.shape, acc.dtype)] if sends_acc else []) + [(own_kv.shape, own_kv.dtype)] * sends_kv
        parts = [acc] * sends_acc + [kv] * sends_kv
        pending = send(parts) if parts else None
        gq, contrib = _step_backward(sched, sched.backward_source(step), dout, q, kv, out, lse, scale)
        dq = _add(dq, gq)
        incoming = None  # the accumulator of the shard worked on at this step
        if pending is not None:
            buf = wait(pending)
            received, link = unpack(buf, specs), buf[-1:]
            incoming = received[0] if sends_acc else None
            kv = received[-1] if sends_kv else kv
        # the first accumulator is this step's gradient alone, sent as first_spec
        acc = _accumulate(incoming, contrib, first_spec if step == 1 else acc_spec, q.device)
    if w > 1:  # one more hop brings every accumulator home
        pending = send([acc])
        if not own_first:
            gq, own = own_step()
            dq = _add(dq, gq)
        acc = unpack(wait(pending), [(own_kv.shape, acc.dtype)])[0]
    acc = _accumulate(acc, own, acc_spec, q.device)
    if dq is None:
        dq = torch.zeros(q.shape, dtype=acc_spec[1], device=q.device)
    return dq.to(q.dtype), acc[0].to(k.dtype), acc[1].to(v.dtype)


def _accumulate(incoming, contrib, spec, device) -> torch.Tensor:
    """incoming + contrib in spec's dtype, either of which may be None (all-zero)."""
    if incoming is None and contrib is None:
        return torch.zeros(spec[0], dtype=spec[1], device=device)
    if incoming is None or contrib is None:
        return (contrib if incoming is None else incoming).to(spec[1])
    return incoming.to(spec[1]) + contrib.to(spec[1])


class RingDense(torch.autograd.Function):
    """Ring attention over this rank's shards as one autograd node.

    The schedule decides what each step computes: `Schedule` (dense or
    causal blocks), or `block_sparse.BlockSparseSchedule`.
    """

    @staticmethod
    def forward(ctx, sched: Schedule, scale: float, group_name: str, q, k, v):
        out, lse, kv_next = ring_forward(sched, q, k, v, scale, group_name)
        ctx.sched, ctx.scale, ctx.group_name = sched, scale, group_name
        # the backward starts with rank r+1's shard: kept (one more shard held) instead of sent again
        ctx.save_for_backward(q, k, v, out, lse, kv_next if sched.world_size > 1 else None)
        return returned_output(out)

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, kv_next = ctx.saved_tensors
        dq, dk, dv = ring_backward(
            ctx.sched, dout.to(q.dtype).contiguous(), q, k, v, out, lse, ctx.scale, ctx.group_name,
            kv_next,
        )
        return None, None, None, dq, dk, dv


def ring_dense(
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
) -> torch.Tensor:
    """Dense (or causal) ring attention of this rank's shards; no checks (see attention.py)."""
    # Under Dynamo the schedule is built uncached (Dynamo does not trace lru_cache cleanly).
    build = make_schedule.__wrapped__ if torch.compiler.is_compiling() else make_schedule
    sched = build(world_size, rank, q.shape[-2], layout, bool(is_causal))
    return RingDense.apply(sched, float(scale), group_name or "", q, k, v)
