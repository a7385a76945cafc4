"""Block results back into sequence order, in one Triton kernel per output (CUDA).

`dilated/compute.py`'s `assemble` and `spread_sum` say what this computes, with
views, pads and pointwise ops that Inductor fuses: about a hundred small
graph pieces for a LongNet site, each a kernel that Inductor compiles and
that reads or writes the whole output. Here each output tile is written
once: a program owns BLOCK_N positions of one (batch, head), visits every
part of the plan whose head set holds that head and whose range meets the
tile, and loads the part's rows straight from the kernel call's result
(whatever its strides). Forward: rows are merged by log-sum-exp
(``merge=True``), giving the output and its log-sum-exp. Backward: rows are
summed (the adjoint of the gather), giving dq, dk or dv.

The plan's geometry and the results' strides reach the kernels as a small
int64 device tensor (`_descriptor`, made on a plan's first call and cached),
so Triton compiles each kernel once per dtypes, head dim, number of outputs
and number of attention calls, not per plan or sequence length (and caches it
on disk like any Triton kernel). Used on real CUDA tensors only, inside the
``dilated_compile::dilated_attention`` and ``ring_attention`` custom ops
(`dilated/op.py`, `ring/op.py`), which therefore run outside CUDA graphs;
while `recording`, the same code runs on the fake tensors of a traced call
and lists its launches instead (for `precompile`).
"""

from __future__ import annotations

import importlib.util
import math
import os
from contextlib import contextmanager
from typing import TYPE_CHECKING, Iterator, NamedTuple, Sequence

import torch

from . import precompile
from .custom_ops import refuse_capture_of_first_call
from .storage import seq_major_empty

if TYPE_CHECKING:
    from ..dilated.plan import Plan

# One part's fields, as the kernel reads them (all in elements).
#   call, h_start, h_stop, h_step, offset, rate, start, seg_len, n_segs,
#   out base/per-batch/per-segment/per-head/per-row strides,
#   lse base/per-batch/per-segment/per-head/per-row strides
FIELDS = 19


def usable(q: torch.Tensor) -> bool:
    """Whether the Triton combine serves a dilated attention of tensors like `q`
    (CUDA, fp16/bf16/fp32, triton importable; real or fake).

    float32 is here too so that Inductor never generates the spread/merge on
    CUDA: Triton 3.6 miscompiles one of those generated kernels on Hopper at
    a launch config Inductor's autotuner picks (README, Known limitations).

    ``DILATED_COMBINE=inductor`` turns it off (benchmarks compare the two).
    """
    choice = os.environ.get("DILATED_COMBINE", "triton")
    if choice not in ("triton", "inductor"):
        raise ValueError(f"DILATED_COMBINE={choice!r}: expected triton or inductor")
    if choice == "inductor" or q.device.type != "cuda":
        return False
    return q.dtype in (torch.float16, torch.bfloat16, torch.float32) and TRITON_INSTALLED


def runs_on(q: torch.Tensor) -> bool:
    """Whether to use the Triton combine now: `usable`, on real tensors, not traced."""
    return (
        usable(q)
        and not isinstance(q, torch._subclasses.FakeTensor)
        and not torch.compiler.is_compiling()
    )


# Whether triton is installed (looked up once, without importing it; a plain
# constant, so that Dynamo tracing a user's call of `dilated_attention` reads it).
TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def _part_strides(strides: tuple[int, ...], index: int, parts, batch: int) -> tuple[int, ...]:
    """(base, per-batch, per-segment, per-head, per-row) element strides of part
    `index` of a call in its result of `strides`: (B*segs, heads, m[, D]) for a call
    of one part, (rows, 1, m[, D]) with parts stacked along rows for a batched call."""
    s0, s1, s2 = strides[:3]
    p = parts[index]
    if len(parts) == 1:
        return (0, p.n_segs * s0, s0, s1, s2)
    row0 = sum(batch * q.n_segs * q.n_heads for q in parts[:index])
    return (row0 * s0, p.n_segs * p.n_heads * s0, p.n_heads * s0, s0, s2)


def _descriptor_of(calls, out_strides, lse_strides, batch: int) -> tuple[int, ...]:
    """The FIELDS ints of every part of `calls`, in order, flat."""
    fields: list[int] = []
    for c, parts in enumerate(calls):
        for i, p in enumerate(parts):
            fields += [c, p.h_start, p.h_stop, p.h_step, p.offset, p.rate, p.start, p.seg_len, p.n_segs]
            fields += _part_strides(out_strides[c], i, parts, batch)
            fields += _part_strides(lse_strides[c], i, parts, batch) if lse_strides is not None else [0] * 5
    return tuple(fields)


class _Descriptor(NamedTuple):
    """A plan's parts as the kernels read them, on the results' device.

    `table` is int64, flat: first the FIELDS ints of each of the `n_parts` parts
    (`_descriptor_of`) and of one part that meets nothing, then, for each of the
    `heads` heads, the row numbers of the `per_head` parts whose head set holds it
    (padded with the empty part), so that a program visits only its head's parts.
    `align` is the largest power of two up to 16 that divides every block offset
    (for vector loads)."""

    table: torch.Tensor
    n_parts: int
    per_head: int
    align: int


# A part that meets no tile (no heads, no segments; lengths 1), the head lists' padding.
_EMPTY_PART = (0, 0, 0, 1, 0, 1, 0, 1) + (0,) * (FIELDS - 8)


def _head_lists(rows: list[tuple[int, ...]], heads: int) -> tuple[int, list[int]]:
    """(per_head, the flat heads x per_head row numbers) of `_Descriptor`."""
    lists = [
        [k for k, (_, h0, h1, step, *_rest) in enumerate(rows) if h0 <= h < h1 and (h - h0) % step == 0]
        for h in range(heads)
    ]
    per_head = max(map(len, lists), default=0)
    return per_head, [k for ks in lists for k in ks + [len(rows)] * (per_head - len(ks))]


# Descriptors by (id of the calls tuple, result strides, batch, heads, device): plans are
# cached (`dilated/plan.py`'s `make_plan`), so their call tuples are the same objects on every
# call and need no hashing (hashing the parts cost more than the lookup saves).
# Each entry keeps its calls tuple, so an id reused by a new tuple cannot match.
_DESCRIPTORS: dict[tuple, tuple[tuple, _Descriptor]] = {}
_DESCRIPTORS_MAX = 1024


def _descriptor(calls: tuple, outs: Sequence[torch.Tensor], lses, batch: int, heads: int) -> _Descriptor:
    """The kernels' descriptor of `calls` (a tuple of part tuples; call c's results
    are ``outs[c]`` and ``lses[c]``) for a grid of `heads` heads, made on the plan's
    first call with these result strides and kept for later ones: one
    host-to-device copy per plan and layout. While `recording`, its table is only
    described (the tensors may be fake) and nothing is kept.

    Raises RuntimeError if that first call is being captured into a CUDA graph."""
    out_strides = tuple(o.stride() for o in outs)
    lse_strides = tuple(l.stride() for l in lses) if lses is not None else None
    device = outs[0].device
    key = (id(calls), out_strides, lse_strides, batch, heads, device)
    hit = _DESCRIPTORS.get(key)
    if hit is not None and hit[0] is calls:
        return hit[1]
    fields = _descriptor_of(calls, out_strides, lse_strides, batch)
    rows = [fields[i:i + FIELDS] for i in range(0, len(fields), FIELDS)]
    align = math.gcd(16, *(x for row in rows for x in row[9:14]))  # the out base and strides
    per_head, head_lists = _head_lists(rows, heads)
    if _recorded is not None:
        return _Descriptor(precompile.TensorArg(torch.int64), len(rows), per_head, align)
    refuse_capture_of_first_call(device)
    if len(_DESCRIPTORS) >= _DESCRIPTORS_MAX:
        _DESCRIPTORS.clear()
    table = torch.tensor(fields + _EMPTY_PART + tuple(head_lists), dtype=torch.int64)
    desc = _Descriptor(table.to(device), len(rows), per_head, align)
    _DESCRIPTORS[key] = (calls, desc)
    return desc


def _kernel(name: str = "combine_kernel"):
    """A Triton kernel of `combine_kernel.py`, imported on first use (triton is
    needed only on CUDA)."""
    from . import combine_kernel

    return getattr(combine_kernel, name)


# The launches `recording` collects instead of running them; None: launches run.
_recorded: list[precompile.KernelLaunch] | None = None


@contextmanager
def recording() -> Iterator[list[precompile.KernelLaunch]]:
    """Within it, the combine's launches are listed (for `precompile`), not run: the
    tensors may be fake, and no descriptor is made or kept."""
    global _recorded
    saved, _recorded = _recorded, []
    try:
        yield _recorded
    finally:
        _recorded = saved


def _run(name: str, grid: tuple, device: torch.device, *args, **kwargs) -> None:
    """Launch the kernel `name` (or list the launch while `recording`)."""
    fn = _kernel(name)
    if _recorded is not None:
        _recorded.append(precompile.KernelLaunch.of(fn, args, **kwargs))
        return
    if precompile.pending():
        precompile.wait(device, precompile.KernelLaunch.of(fn, args, **kwargs))
    fn[grid](*args, **kwargs)


BLOCK_N = 32
# Warps of a `combine_kernel` program. Two rather than Triton's default four: on an H100
# (bf16, 16 heads, head dim 128, LongNet's segments 2048..32768) the LongNet merge took
# 0.57 ms instead of 0.67 at 64k tokens and 1.12 instead of 1.32 at 128k, the spread of
# dq/dk/dv 2% less; eight warps took 1.3x as long as four.
COMBINE_WARPS = 2


def _launch(plan: Plan, srcs, lses, batch: int, dsts, dst_lse) -> None:
    """One `combine_kernel` launch: ``dsts[s]`` (B, N, H, D) views from the calls'
    results ``srcs[s]``, merged with `lses` into `dst_lse` (one output) or, with
    ``dst_lse=None``, summed. Every ``srcs[s]`` must have the strides of ``srcs[0]``."""
    b, n, h, d = dsts[0].shape  # sequence-major (B, N, H, D)
    desc = _descriptor(plan.calls, srcs[0], lses, batch, h)
    merge = dst_lse is not None
    lse_strides = dst_lse.stride() if merge else (0, 0, 0)
    _run(
        "combine_kernel", (_cdiv(n, BLOCK_N), h, b * len(dsts)), dsts[0].device,
        tuple(r for per_dst in srcs for r in per_dst), tuple(lses) if merge else srcs[0],
        tuple(dsts), dst_lse if merge else dsts[0], desc.table, desc.n_parts, desc.per_head, n,
        *dsts[0].stride()[:3], *lse_strides,
        MERGE=merge, N_DST=len(dsts), N_CALLS=len(plan.calls), ALIGN=desc.align,
        HEAD_DIM=d, BLOCK_D=_block_d(d), BLOCK_N=BLOCK_N, num_warps=COMBINE_WARPS,
    )


def _unit_last_stride(results) -> tuple[torch.Tensor, ...]:
    return tuple(r if r.stride(-1) == 1 else r.contiguous() for r in results)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _block_d(d: int) -> int:
    return max(16, 1 << (d - 1).bit_length())


def merge(plan: Plan, outs, lses, like: torch.Tensor):
    """(out, lse) from the calls' results, as `compute.assemble` defines them:
    out (B, H, N, D) in `like`'s dtype, lse (B, H, N) float32, both stored
    sequence-major; lse is -inf and out 0 where no pattern selects a position."""
    b, h, n, d = like.shape
    out = seq_major_empty(like, (b, h, n, outs[0].shape[-1] if outs else d), like.dtype)
    lse = seq_major_empty(like, (b, h, n), torch.float32)
    if not outs:
        return out.zero_(), lse.fill_(-math.inf)
    _launch(plan, (_unit_last_stride(outs),), lses, b, (out.transpose(1, 2),), lse.transpose(1, 2))
    return out, lse


def spread_sum(plan: Plan, grads: Sequence[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """`compute.spread_sum` in `like`'s dtype, stored sequence-major."""
    out = seq_major_empty(like, like.shape, like.dtype)
    if not grads:
        return out.zero_()
    _launch(plan, (_unit_last_stride(grads),), None, like.shape[0], (out.transpose(1, 2),), None)
    return out


def spread_sums(
    plan: Plan, grads: Sequence[Sequence[torch.Tensor]], likes: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, ...]:
    """`spread_sum` of each gradient (``grads[s]``: the calls' blocks, summed into a
    tensor like ``likes[s]``), in one launch when the outputs share shape and dtype
    and the blocks share their strides (dq, dk and dv of one plan do), else one each."""
    like = likes[0]
    grads = tuple(_unit_last_stride(g) for g in grads)
    strides = [r.stride() for r in grads[0]]
    one_launch = all(grads) and all(
        x.shape == like.shape and x.dtype == like.dtype and x.device == like.device
        and [r.stride() for r in g] == strides
        for g, x in zip(grads, likes)
    )
    if not one_launch:
        return tuple(spread_sum(plan, g, x) for g, x in zip(grads, likes))
    outs = tuple(seq_major_empty(like, like.shape, like.dtype) for _ in likes)
    _launch(plan, grads, None, like.shape[0], tuple(o.transpose(1, 2) for o in outs), None)
    return outs


def gather_into(calls: tuple, srcs: Sequence[torch.Tensor], bufs, lse=None, lse_bufs=None) -> None:
    """Fill ``bufs[s][c]``, source s's block of call c, from the (B, H, N, D)
    sources `srcs` (one kernel for all), and with `lse` the (B, H, N) `lse_bufs[c]`.

    The blocks of one call share their layout (any strides), as the kernel
    reads one descriptor; `calls` is a tuple of part tuples (a plan's, kept
    by the plan: its descriptor is remembered by identity)."""
    if not calls:
        return
    b, h, n, d = srcs[0].shape
    desc = _descriptor(calls, bufs[0], lse_bufs, b, h)
    for per_src in bufs[1:]:
        if any(x.stride() != y.stride() for x, y in zip(per_src, bufs[0])):
            raise ValueError("gather_into: the blocks of one call must share their layout")
    srcs = [t if t.stride(-1) == 1 else t.contiguous() for t in srcs]
    has_lse = lse is not None
    lse_src = lse.transpose(1, 2) if has_lse else srcs[0]
    _run(
        "gather_kernel", (_cdiv(n, BLOCK_N), h, b), srcs[0].device,
        tuple(tuple(x) for x in bufs), tuple(srcs),
        tuple((t.stride(0), t.stride(2), t.stride(1)) for t in srcs),  # per batch, position, head
        tuple(lse_bufs) if has_lse else tuple(bufs[0]), lse_src, desc.table, desc.n_parts, desc.per_head, n,
        *(lse_src.stride()[:3] if has_lse else (0, 0, 0)),
        N_SRC=len(srcs), N_CALLS=len(calls), HAS_LSE=has_lse, ALIGN=desc.align,
        HEAD_DIM=d, BLOCK_D=_block_d(d), BLOCK_N=BLOCK_N,
    )


def backward_blocks(plan: Plan, dout: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, qs):
    """Each call's (grad_out, out, lse) blocks, gathered from the merged (B, H, N, D)
    `dout`, `out` and (B, H, N) `lse` in one kernel: grad_out and out laid out like
    ``empty_like`` of the call's query block (what cuDNN's backward wants), lse
    dense. `qs` are the calls' query blocks."""
    douts = [torch.empty_like(q, dtype=out.dtype) for q in qs]
    outs = [torch.empty_like(q, dtype=out.dtype) for q in qs]
    lses = [torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device) for q in qs]
    gather_into(plan.calls, (dout, out), (douts, outs), lse, lses)
    return douts, outs, lses
