"""Dilated attention (docs/spec.md, "Dilated attention") forward and backward, from a `Plan`.

Gathers each part's blocks of q, k, v, runs the fused block-attention kernel,
spreads the results back to their positions, and with
``head_split="longnet"`` merges the patterns by log-sum-exp (with
``"groups"`` a head uses one pattern and no merge is needed).

Everything here is shape arithmetic on views, `cat`, `pad` and pointwise ops,
so under Inductor the spread and merge become fused pointwise kernels; the
attention itself runs in the fused kernel `block_attention` picks. On CUDA
(fp16, bf16, fp32) the attention is instead one opaque custom op
(``dilated_compile::dilated_attention``, `op.py`) that runs this module's
forward and backward on real tensors, with the spread and merge done by one
Triton kernel per output (`common/combine.py`).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from ..common import combine
from ..common.block_kernels import accumulation_dtype, block_attention, block_attention_backward
from ..common.merge import merge_by_lse
from . import worklist
from .kernel_choice import WORKLIST, choose
from .plan import Job, Part, Plan

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


def gathered_forward(plan: Plan, is_causal: bool, scale: float, q, k, v):
    """`dilated_forward` on CUDA as gathered blocks: block views or one gather, the
    block kernel per call, one merge (`combine`). Stored sequence-major."""
    qs, ks, vs = gather_blocks(plan, (q, k, v))
    results = [
        block_attention(a, b, c, is_causal=is_causal, scale=scale, direct=True) for a, b, c in zip(qs, ks, vs)
    ]
    return combine.merge(plan, [r.out for r in results], [r.lse for r in results], q)


def gathered_backward(plan: Plan, is_causal: bool, scale: float, q, k, v, out, lse, dout):
    """`dilated_backward` on CUDA as gathered blocks (see `gathered_forward`)."""
    qs, ks, vs = gather_blocks(plan, (q, k, v))
    douts, outs, lses = combine.backward_blocks(plan, dout, out, lse, qs)
    grads = [
        block_attention_backward(d, a, b, c, o, l, is_causal=is_causal, scale=scale, direct=True)
        for d, a, b, c, o, l in zip(douts, qs, ks, vs, outs, lses)
    ]
    if not grads:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    return combine.spread_sums(plan, tuple(zip(*grads)), (q, k, v))


def gathered_launches(plan: Plan, is_causal: bool, scale: float, tensors: tuple) -> list:
    """The combine launches (`precompile.KernelLaunch`) of the first `gathered_forward`
    (`tensors` = q, k, v) or `gathered_backward` (q, k, v, out, lse, dout) call with
    tensors like these; on fake tensors, nothing runs."""
    with combine.recording() as launches:
        if len(tensors) == 3:
            gathered_forward(plan, is_causal, scale, *tensors)
        else:
            gathered_backward(plan, is_causal, scale, *tensors)
    return launches


def dilated_forward(plan: Plan, is_causal: bool, scale: float, q, k, v):
    """(out, lse) of the dilated attention `plan` describes: out (B, H, N, D) in q's
    dtype, lse (B, H, N) in the accumulation dtype (-inf where no pattern selects).

    CUDA fp16/bf16 runs the one-launch work list (`worklist.py`) where `kernel_choice`
    picks it."""
    if combine.runs_on(q):
        if choose(plan, q, is_causal).forward == WORKLIST:
            return worklist.forward(plan, is_causal, scale, q, k, v)
        return gathered_forward(plan, is_causal, scale, q, k, v)
    qs, ks, vs = (gather_calls(plan, x) for x in (q, k, v))
    results = [block_attention(a, b, c, is_causal=is_causal, scale=scale) for a, b, c in zip(qs, ks, vs)]
    out, lse = assemble(plan, [r.out for r in results], [r.lse for r in results], q.shape[0], q)
    return out.to(q.dtype), lse


def dilated_backward(plan: Plan, is_causal: bool, scale: float, q, k, v, out, lse, dout):
    """(dq, dk, dv) of the dilated attention `plan` describes, from its merged out and lse.

    Gathers out and lse at each block's positions, runs the kernel's backward
    with them, and spreads the block gradients back in one pass per tensor
    (`spread_sum`). CUDA fp16/bf16 runs the work list's backward (`worklist.py`) where
    `kernel_choice` picks it.
    """
    if combine.runs_on(q):
        if choose(plan, q, is_causal).backward == WORKLIST:
            return worklist.backward(plan, is_causal, scale, q, k, v, out, lse, dout)
        return gathered_backward(plan, is_causal, scale, q, k, v, out, lse, dout)
    qs, ks, vs = (gather_calls(plan, x) for x in (q, k, v))
    douts = gather_calls(plan, dout.to(out.dtype))
    outs = gather_calls(plan, out)
    lses = [t.squeeze(-1) for t in gather_calls(plan, lse.unsqueeze(-1))]
    grads = [
        block_attention_backward(d, a, b, c, o, l, is_causal=is_causal, scale=scale)
        for d, a, b, c, o, l in zip(douts, qs, ks, vs, outs, lses)
    ]
    if not grads:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    acc = accumulation_dtype(q)
    return tuple(
        spread_sum(plan, [t.to(acc) for t in g], q).to(x.dtype)
        for g, x in zip(zip(*grads), (q, k, v))
    )
