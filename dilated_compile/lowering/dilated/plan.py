"""Dilated attention (shared/SPEC.md section 3), forward and backward.

Each (pattern, offset) picks, inside every segment of w positions, the
positions o, o+r, o+2r, ...: a strided view of the sequence. A part large
enough to fill a GPU, or to fill whole waves of its multiprocessors nearly
exactly, is one `block_attention` call on that view (no copy where the
strides allow); other small parts of the same length are copied into one
batched call. The results are spread back to their positions. With
``head_split="longnet"`` a head uses every pattern and the patterns' results
are merged by log-sum-exp; with ``"groups"`` a head uses one pattern and no
merge is needed.

Everything here is shape arithmetic on views, `cat`, `pad` and pointwise ops,
so under Inductor the spread and merge become fused pointwise kernels; the
attention itself runs in the fused kernel `block_attention` picks. On CUDA
(fp16, bf16, fp32) the attention is instead one opaque custom op
(``dilated_compile::dilated_attention``, `dynamic.py`) that runs this module's
forward and backward on real tensors, with the spread and merge done by one
Triton kernel per output (`combine.py`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property, lru_cache
from typing import Sequence

import torch
import torch.nn.functional as F

from . import combine
from .autograd_output import returned_output
from .kernels import (
    accumulation_dtype,
    block_attention,
    block_attention_backward,
    choose_kernel,
    multiprocessors,
)

HEAD_SPLITS = ("groups", "longnet")


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


def _head_sets(num_heads: int, n_patterns: int, rates: Sequence[int], head_split: str):
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
    for i, h0, h1, hs, o in _head_sets(num_heads, len(segment_lengths), dilation_rates, head_split):
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


# --------------------------------------------------------------------------
# gather: (B, H, N, X) -> (B * segments, heads, m, X) blocks of one part, a
# strided view where the strides allow; spread: its inverse into (B, N', heads, X)
# (sequence-major, so the final output is stored as (B, N, H, D) like the
# projections around attention expect), filling unselected positions.


def _gather(x: torch.Tensor, p: Part) -> torch.Tensor:
    b, x_dim = x.shape[0], x.shape[-1]
    y = x[:, p.h_start : p.h_stop : p.h_step, p.start : p.start + p.n_segs * p.seg_len]
    y = y.unflatten(2, (p.n_segs, p.seg_len))[:, :, :, p.offset :: p.rate]  # (B, A, S, m, X)
    return y.permute(0, 2, 1, 3, 4).reshape(b * p.n_segs, p.n_heads, p.m, x_dim)


def _spread(y: torch.Tensor, p: Part, batch: int, fill: float) -> torch.Tensor:
    """(B * segments, heads, m, X) -> (B, n_segs * seg_len, heads, X)."""
    x_dim = y.shape[-1]
    y = y.reshape(batch, p.n_segs, p.n_heads, p.m, 1, x_dim)
    y = F.pad(y, (0, 0, 0, p.rate - 1), value=fill)  # each row, then rate-1 fillers
    y = y.reshape(batch, p.n_segs, p.n_heads, p.m * p.rate, x_dim)
    y = F.pad(y, (0, 0, p.offset, 0), value=fill)[:, :, :, : p.seg_len]
    if y.shape[3] < p.seg_len:
        y = F.pad(y, (0, 0, 0, p.seg_len - y.shape[3]), value=fill)
    return y.permute(0, 1, 3, 2, 4).reshape(batch, p.n_segs * p.seg_len, p.n_heads, x_dim)


def _filler(p: Part, batch: int, x_dim: int, fill: float, like: torch.Tensor) -> torch.Tensor:
    return like.new_full((batch, p.n_segs * p.seg_len, p.n_heads, x_dim), fill)


def _part_view(x: torch.Tensor, p: Part) -> torch.Tensor:
    """Part `p` of (B, H, N, X) `x` as one (B, segments, heads, m, X) strided view."""
    sb, sh, sn, sx = x.stride()
    return x.as_strided(
        (x.shape[0], p.n_segs, p.n_heads, p.m, x.shape[3]),
        (sb, p.seg_len * sn, p.h_step * sh, p.rate * sn, sx),
        x.storage_offset() + p.h_start * sh + (p.start + p.offset) * sn,
    )


def gather_calls(plan: Plan, x: torch.Tensor) -> list[torch.Tensor]:
    """One (rows, heads, m, X) block tensor per kernel call, from full (B, H, N, X) `x`."""
    out = []
    for parts in plan.calls:
        if len(parts) == 1:
            out.append(_gather(x, parts[0]))
        else:  # heads folded into rows: (sum of B*segments*heads, 1, m, X)
            out.append(torch.cat([_gather(x, p).flatten(0, 1).unsqueeze(1) for p in parts]))
    return out


def gather_blocks(plan: Plan, xs: Sequence[torch.Tensor]) -> list[list[torch.Tensor]]:
    """`gather_calls` of each (B, H, N, D) tensor of `xs` in the fewest operations,
    for real CUDA tensors (the Triton path): one strided view per call of one
    part, and one Triton kernel that fills every batched call's block of every
    tensor."""
    blocks: list[list] = [[None] * len(plan.calls) for _ in xs]
    for c, parts in enumerate(plan.calls):
        if len(parts) == 1:
            for per_x, x in zip(blocks, xs):
                per_x[c] = _part_view(x, parts[0]).flatten(0, 1)
    if plan.batched:
        batch = xs[0].shape[0]
        shapes = [(batch * plan.rows_per_batch[c], 1, plan.calls[c][0].m) for c in plan.batched]
        bufs = [[x.new_empty((*shape, x.shape[3])) for shape in shapes] for x in xs]
        combine.gather_into(plan.batched_calls, xs, bufs)
        for per_x, per_buf in zip(blocks, bufs):
            for c, buf in zip(plan.batched, per_buf):
                per_x[c] = buf
    return blocks


def spread_jobs(
    plan: Plan, results: Sequence[torch.Tensor], batch: int, fill: float, like: torch.Tensor
) -> dict[Job, torch.Tensor]:
    """Each job's (B, N, heads, X) tensor from the calls' (rows, heads, m, X) results."""
    pieces: dict[Part, torch.Tensor] = {}
    for parts, res in zip(plan.calls, results):
        if len(parts) == 1:
            pieces[parts[0]] = _spread(res, parts[0], batch, fill)
            continue
        sizes = [batch * p.n_segs * p.n_heads for p in parts]
        for p, chunk in zip(parts, torch.split(res, sizes)):
            chunk = chunk.reshape(batch * p.n_segs, p.n_heads, p.m, chunk.shape[-1])
            pieces[p] = _spread(chunk, p, batch, fill)
    x_dim = results[0].shape[-1] if results else like.shape[-1]
    out = {}
    for job in plan.jobs:
        seq = [
            pieces[p] if p in pieces else _filler(p, batch, x_dim, fill, like) for p in job.parts
        ]
        out[job] = seq[0] if len(seq) == 1 else torch.cat(seq, dim=1)
    return out


def _interleave_heads(per_offset: list[torch.Tensor], num_heads: int, fill: float) -> torch.Tensor:
    """Heads o, o+r, o+2r.. for each offset o (list index) -> heads 0..H-1 in order.

    Tensors are (B, N, heads, X); the result is (B, N, H, X).
    """
    a = max(t.shape[2] for t in per_offset)
    padded = [F.pad(t, (0, 0, 0, a - t.shape[2]), value=fill) for t in per_offset]
    stacked = torch.stack(padded, dim=3)  # (B, N, a, n_off, X)
    return stacked.flatten(2, 3)[:, :, :num_heads]


def heads_in_order(plan: Plan, pieces: dict[Job, torch.Tensor], fill: float) -> list[torch.Tensor]:
    """Per head set's (B, N, heads, X) tensors -> the (B, N, H, X) tensors to combine.

    ``groups``: one tensor, the head sets side by side. ``longnet``: one tensor
    per pattern, its offsets' heads interleaved back into order.
    """
    if plan.head_split == "groups":
        return [torch.cat([pieces[j] for j in plan.jobs], dim=2)]
    return [
        _interleave_heads([pieces[j] for j in plan.jobs if j.pattern == i], plan.num_heads, fill)
        for i in range(plan.n_patterns)
    ]


def merge_by_lse(outs: list[torch.Tensor], lses: list[torch.Tensor]):
    """One softmax over the union of the patterns' keys: (out, lse) from partials.

    Pointwise over the list (no stack), so it fuses into one kernel. Where no
    pattern selects a position (all lse = -inf) the output is 0, lse -inf.
    """
    top = lses[0]
    for l in lses[1:]:
        top = torch.maximum(top, l)
    safe_top = torch.where(torch.isinf(top), torch.zeros_like(top), top)
    weights = [torch.exp(l - safe_top) for l in lses]
    total = weights[0]
    for wgt in weights[1:]:
        total = total + wgt
    safe_total = torch.where(total > 0, total, torch.ones_like(total))
    out = weights[0].unsqueeze(-1) * outs[0]
    for wgt, o in zip(weights[1:], outs[1:]):
        out = out + wgt.unsqueeze(-1) * o
    out = out / safe_total.unsqueeze(-1)
    lse = torch.where(total > 0, safe_top + torch.log(safe_total), torch.full_like(top, -math.inf))
    return out, lse


def assemble(plan: Plan, out_blocks, lse_blocks, batch: int, like: torch.Tensor):
    """Spread block results back and merge patterns by log-sum-exp.

    Returns (out, lse): out (B, H, N, D) in float32/64 stored as (B, N, H, D),
    lse (B, H, N); lse is -inf where no pattern selects a position, and the
    output is 0 there.
    """
    acc = lse_blocks[0].dtype if lse_blocks else torch.float32
    outs = spread_jobs(plan, out_blocks, batch, 0.0, like)
    lses = spread_jobs(plan, [l.unsqueeze(-1) for l in lse_blocks], batch, -math.inf, like)
    per_out = [t.to(acc) for t in heads_in_order(plan, outs, 0.0)]
    per_lse = [t.squeeze(-1).to(acc) for t in heads_in_order(plan, lses, -math.inf)]
    if plan.head_split == "groups":  # one pattern per head: nothing to merge
        out, lse = per_out[0], per_lse[0]
    else:
        out, lse = merge_by_lse(per_out, per_lse)
    return out.transpose(1, 2), lse.transpose(1, 2)


def spread_sum(plan: Plan, block_grads: Sequence[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """The (B, H, N, D) sum of block tensors spread back to their positions.

    The adjoint of `gather_calls`: a position used by several patterns gets
    the sum of their contributions, unused positions 0. Pointwise, so it
    fuses into one kernel per tensor.
    """
    per_pattern = heads_in_order(plan, spread_jobs(plan, block_grads, like.shape[0], 0.0, like), 0.0)
    total = per_pattern[0]
    for part in per_pattern[1:]:
        total = total + part
    return total.transpose(1, 2)


def dilated_forward(plan: Plan, is_causal: bool, scale: float, q, k, v):
    """(out, lse) of the dilated attention `plan` describes: out (B, H, N, D) in q's
    dtype, lse (B, H, N) in the accumulation dtype (-inf where no pattern selects)."""
    fused = combine.runs_on(q)
    if fused:
        qs, ks, vs = gather_blocks(plan, (q, k, v))
    else:
        qs, ks, vs = (gather_calls(plan, x) for x in (q, k, v))
    results = [
        block_attention(a, b, c, is_causal=is_causal, scale=scale, direct=fused)
        for a, b, c in zip(qs, ks, vs)
    ]
    if fused:
        return combine.merge(plan, [r.out for r in results], [r.lse for r in results], q)
    out, lse = assemble(plan, [r.out for r in results], [r.lse for r in results], q.shape[0], q)
    return out.to(q.dtype), lse


def dilated_backward(plan: Plan, is_causal: bool, scale: float, q, k, v, out, lse, dout):
    """(dq, dk, dv) of the dilated attention `plan` describes, from its merged out and lse.

    Gathers out and lse at each block's positions, runs the kernel's backward
    with them, and spreads the block gradients back in one pass per tensor
    (`spread_sum`).
    """
    fused = combine.runs_on(q)
    if fused:
        qs, ks, vs = gather_blocks(plan, (q, k, v))
        douts, outs, lses = combine.backward_blocks(plan, dout, out, lse, qs)
    else:
        qs, ks, vs = (gather_calls(plan, x) for x in (q, k, v))
        douts = gather_calls(plan, dout.to(out.dtype))
        outs = gather_calls(plan, out)
        lses = [t.squeeze(-1) for t in gather_calls(plan, lse.unsqueeze(-1))]
    grads = [
        block_attention_backward(d, a, b, c, o, l, is_causal=is_causal, scale=scale, direct=fused)
        for d, a, b, c, o, l in zip(douts, qs, ks, vs, outs, lses)
    ]
    if not grads:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    if fused:
        return combine.spread_sums(plan, tuple(zip(*grads)), (q, k, v))
    acc = accumulation_dtype(q)
    return tuple(
        spread_sum(plan, [t.to(acc) for t in g], q).to(x.dtype)
        for g, x in zip(zip(*grads), (q, k, v))
    )


class _DilatedAttention(torch.autograd.Function):
    """Gather, block attention, spread and merge, as one autograd node."""

    @staticmethod
    def forward(ctx, plan: Plan, is_causal: bool, scale: float, q, k, v):
        out, lse = dilated_forward(plan, is_causal, scale, q, k, v)
        ctx.plan, ctx.is_causal, ctx.scale = plan, is_causal, scale
        ctx.save_for_backward(q, k, v, out, lse)
        return returned_output(out)

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = dilated_backward(ctx.plan, ctx.is_causal, ctx.scale, q, k, v, out, lse, dout)
        return None, None, None, dq, dk, dv


def check_dilated_args(
    segment_lengths: Sequence[int], dilation_rates: Sequence[int], head_split: str
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Validated (segment_lengths, dilation_rates) as tuples of ints."""
    seg, rates = tuple(segment_lengths), tuple(dilation_rates)
    if not seg or len(seg) != len(rates):
        raise ValueError(
            f"segment_lengths {list(seg)} and dilation_rates {list(rates)} must be non-empty "
            "lists of the same length"
        )
    for name, values in (("segment_lengths", seg), ("dilation_rates", rates)):
        if any(isinstance(x, bool) or int(x) != x or x < 1 for x in values):
            raise ValueError(f"{name} must be positive integers, got {list(values)}")
    if head_split not in HEAD_SPLITS:
        raise ValueError(f"head_split={head_split!r}: expected one of {', '.join(HEAD_SPLITS)}")
    return tuple(int(x) for x in seg), tuple(int(x) for x in rates)


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Raise if q, k, v are not (batch, heads, seq, dim) self-attention tensors."""
    if q.dim() != 4 or k.shape != q.shape or v.shape[:-1] != q.shape[:-1]:
        raise ValueError(
            "expected q, k, v of shape (batch, heads, seq, head_dim) with equal batch, heads "
            f"and sequence length; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if v.shape[-1] != q.shape[-1]:
        raise ValueError(
            f"value head_dim {v.shape[-1]} differs from query head_dim {q.shape[-1]}: "
            "not supported"
        )


def dilated_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    *,
    head_split: str = "groups",
    is_causal: bool = False,
    scale: float | None = None,
) -> torch.Tensor:
    """Dilated attention of (batch, heads, seq, head_dim) tensors (SPEC section 3).

    Differentiable; the same function the compiled rewrite runs.
    """
    seg, rates = check_dilated_args(segment_lengths, dilation_rates, head_split)
    check_qkv(q, k, v)
    b, h, n, d = q.shape
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    if n == 0:
        return q.new_zeros(q.shape)
    if combine.usable(q):
        # CUDA (fp16/bf16/fp32): the whole attention is one opaque op whose
        # spread and merge are the Triton combine (Inductor compiles nothing
        # of it: fewer kernels, and a compile time like dense attention's).
        from .dynamic import dilated_attention_op

        out, _ = dilated_attention_op(
            q, k, v, list(seg), list(rates), head_split, bool(is_causal), float(scale), 0
        )
        return out
    plan = plan_for(q, seg, rates, head_split)
    return _DilatedAttention.apply(plan, bool(is_causal), float(scale), q, k, v)


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
