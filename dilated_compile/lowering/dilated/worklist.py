"""Dilated attention as one Triton work list: every part of a site in one launch.

A *work item* is one (head, pattern, segment, offset, row block) of a `Plan`:
the rows ``pos0 + i * rate`` of one segment, i in the block. The forward
kernel (`worklist_forward.py`) runs every item of a call in one launch (grid:
items x batch), reading q, k, v rows in place, the dilation a row stride;
the ``longnet`` split either runs as one softmax over its patterns' keys
(`worklist_union.py`, `worklist_items.runs_as_union`) or adds one launch
that merges the patterns by log-sum-exp. The backward (`worklist_backward.py`,
or the union's) runs from the same items.

Everything that depends only on shapes is decided once and cached: the items
as an int32 device tensor and the compact row layout of the ``longnet`` split
per (plan, block size, device); the launches (grids, integer arguments,
output layouts) per call signature (plan, causality, shapes and strides,
dtype, device). After a kernel's first launch through Triton's JIT, later
launches with the same specialisation go straight to the compiled kernel on
the current stream: a call is its allocations and launches.

Runs CUDA fp16/bf16 inside the ``dilated_compile::dilated_attention`` custom op
where `kernel_choice.py` picks it (`compute.py` routes there).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import _disable_current_modes

from ..common import precompile
from ..common.custom_ops import refuse_capture_of_first_call
from ..common.storage import seq_major_storage, seq_major_strides
from .plan import Plan
from .worklist_blocks import (
    BACKWARD_SETTING,
    FORWARD_SETTING,
    TMA_SETTING,
    Blocks,
    allocator_ready,
    backward_blocks,
    descriptor_strides,
    forward_blocks,
    forward_descriptor_blocks,
)
from .worklist_items import UNION_SETTING, head_rows, pattern_geometry, runs_as_union, union_items, work_items


def per_pattern_rows(plan: Plan, union: bool) -> bool:
    """Whether the work list computes `plan` per pattern into compact rows, merged (forward)
    or summed (backward) afterwards: ``longnet`` where it does not run as one softmax."""
    return plan.head_split == "longnet" and not union


@dataclass(frozen=True)
class WorkList:
    """A plan's work items for one row block size, on one device."""

    items: torch.Tensor  # (n_items, ITEM_FIELDS) int32; union: (n_items, UNION_FIELDS + 3 * patterns)
    compact: bool  # longnet: per-pattern compact rows, merged afterwards
    head_rows: int  # compact rows per (batch, head)
    patterns: torch.Tensor  # (n_patterns, 4) int32: w, r, first compact row, rows per segment

    @property
    def n_items(self) -> int:
        return self.items.shape[0]


# Work lists by (id of the plan, blocks, causal, device). Plans are cached by
# `plan.make_plan`, so one plan object serves every call of a shape and needs no
# hashing; each entry keeps its plan, so a reused id cannot match.
_WORK_LISTS: dict[tuple, tuple[Plan, WorkList]] = {}
_WORK_LISTS_MAX = 256


def work_list(plan: Plan, blocks: Blocks, causal: bool, device: torch.device, union: bool = False) -> WorkList:
    """The cached `WorkList` of `plan` for these block sizes on `device` (`union`: the
    items of the ``longnet`` split as one softmax)."""
    key = (id(plan), blocks.block_m, blocks.block_n, causal, device, union)
    hit = _WORK_LISTS.get(key)
    if hit is not None and hit[0] is plan:
        return hit[1]
    refuse_capture_of_first_call(device)
    compact = per_pattern_rows(plan, union)
    # real tensors even while a graph is traced: a traced call's kernels read them as constants
    with _disable_current_modes():
        if union:
            items = union_items(plan, blocks.block_m, causal)
        else:
            items = work_items(plan, blocks.block_m, blocks.block_n, causal, compact)
        wl = WorkList(
            items.to(device),
            compact,
            head_rows(plan),
            torch.tensor(pattern_geometry(plan), dtype=torch.int32).to(device),
        )
    if len(_WORK_LISTS) >= _WORK_LISTS_MAX:
        _WORK_LISTS.clear()
    _WORK_LISTS[key] = (plan, wl)
    return wl


def _kernels():
    from . import worklist_forward

    return worklist_forward


def _backward_kernels():
    from . import worklist_backward

    return worklist_backward


def _union_kernels():
    from . import worklist_union

    return worklist_union


def _unit_last(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The strides of a new contiguous tensor of `shape`."""
    return torch.empty(shape, device="meta").stride()


class _Launch:
    """One kernel launch whose grid, integer and constexpr arguments are fixed.

    `arg_types` gives the run-time arguments a call passes first: the dtype of each
    tensor, ``float`` for a float. Its first call per dtypes and 16-byte alignment
    of `inputs` (what Triton specialises on besides the fixed arguments) goes
    through Triton's JIT; later ones call the compiled kernel that returned, on
    the current stream."""

    __slots__ = ("fn", "grid", "blocks", "tail", "arg_types", "runners")

    def __init__(self, fn, grid: tuple[int, int, int], blocks: Blocks, ints: tuple, consts: tuple,
                 arg_types: tuple):
        self.fn, self.grid, self.blocks = fn, grid, blocks
        self.tail = (*ints, *consts)
        self.arg_types = arg_types
        self.runners: dict[tuple, object] = {}

    def kernel_launch(self) -> precompile.KernelLaunch:
        """What Triton specialises this launch on, its tensors aligned (for `precompile`)."""
        args = tuple(0.0 if t is float else t for t in self.arg_types)
        return precompile.KernelLaunch.of(self.fn, (*args, *self.tail), **self.blocks.options)

    def __call__(self, inputs: tuple, args: tuple, stream) -> None:
        if stream is TRACED:
            self.trace(args)
            return
        spec = tuple((t.dtype, t.data_ptr() % 16) for t in inputs)
        runner = self.runners.get(spec)
        if runner is not None:
            runner(*args, *self.tail, stream=stream)
            return
        if stream is not None and precompile.pending():
            precompile.wait(inputs[0].device, self.kernel_launch())
        kernel = self.fn[self.grid](*args, *self.tail, **self.blocks.options)
        if type(kernel).__name__ == "CompiledKernel" and len(self.runners) < 16:  # not the interpreter
            self.runners[spec] = kernel[self.grid]

    def trace(self, args: tuple) -> None:
        """Record this launch into the graph being traced (``torch.library.wrap_triton``):
        the compiled graph then launches the kernel itself."""
        from torch.library import wrap_triton

        wrap_triton(self.fn)[self.grid](*(_constant(a) for a in args), *self.tail, **self.blocks.options)


def _seq_major(storage: torch.Tensor) -> torch.Tensor:
    """`storage` of `seq_major_storage` seen as (B, H, N[, D])."""
    return storage.transpose(1, 2)


def _stream(device: torch.device):
    """The raw current CUDA stream of `device` (None elsewhere: the interpreter takes none)."""
    return torch._C._cuda_getCurrentRawStream(device.index) if device.type == "cuda" else None


TRACED = object()  # the `stream` of a launch recorded into the graph being traced


def _constant(x):
    """`x`, or for a real tensor met while a graph is traced (the work items), the
    graph's constant holding it."""
    if type(x) is torch.Tensor:  # fake and functional tensors are subclasses
        return torch.ops.aten.lift_fresh.default(x)
    return x


MERGE_BLOCK = 32
PREPARE_BLOCK = 32
CAST_BLOCK = 1024
_MERGE_LAUNCH = Blocks(MERGE_BLOCK, MERGE_BLOCK, 4, 3)  # Triton's default warps and stages
_PREPARE_LAUNCH = Blocks(PREPARE_BLOCK, PREPARE_BLOCK, 4, 3)
_CAST_LAUNCH = Blocks(CAST_BLOCK, CAST_BLOCK, 4, 3)


class _Call:
    """What the forward and the backward of one call signature share: made from
    tensors or fake tensors of the call's shapes (`launches` lists its kernels for
    `precompile`), it makes its work list on the first call (`_bind`), which also
    fixes the item launch's grid and whether the call has nothing to compute."""

    attend: _Launch

    def __init__(self, plan: Plan, causal: bool, batch: int, blocks: Blocks, union: bool):
        self.plan, self.causal, self.batch, self.blocks, self.union = plan, causal, batch, blocks, union
        self.compact = per_pattern_rows(plan, union)
        self.wl: WorkList | None = None
        self.empty = True

    def _bind(self, device: torch.device) -> WorkList:
        if self.wl is None:
            self.wl = work_list(self.plan, self.blocks, self.causal, device, self.union)
            self.attend.grid = (self.wl.n_items, self.batch, 1)
            self.empty = self.wl.n_items == 0 or self.batch == 0
        return self.wl


class _ForwardCall(_Call):
    """The work-list forward of one call signature (plan, causality, shapes and
    strides, dtype, device): what a call allocates and launches, decided once."""

    def __init__(self, plan: Plan, causal: bool, q, k, v):
        b, h, n, d = q.shape
        union = runs_as_union(plan, causal, backward=False)
        super().__init__(plan, causal, b, forward_blocks(q, union), union)
        blocks = self.blocks
        self.out_shape, self.out_strides = tuple(q.shape), seq_major_strides(q.shape)
        self.lse_shape, self.lse_strides = (b, h, n), seq_major_strides((b, h, n))
        compact = self.compact
        if compact:
            # each pattern's rows in q's dtype (as the gathered-block kernels give them), merged in fp32
            self.target_shape = (b, h, head_rows(plan), d)
            target_strides = _strides(self.target_shape)
            target_lse_strides = _strides(self.target_shape[:3])
        else:
            target_strides, target_lse_strides = self.out_strides, self.lse_strides
        kern = _kernels()
        fn, mode = kern.forward_kernel, (causal, compact)
        if union:
            fn, mode = _union_kernels().union_forward_kernel, (plan.n_patterns, causal)
        ints = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *target_strides[:3], *target_lse_strides)
        consts = (*mode, blocks.block_m, blocks.block_n, d, q.dtype == torch.float32)
        types = (q.dtype, k.dtype, v.dtype, q.dtype, torch.float32, torch.int32, float)
        # (items, batch): items set on the first call
        self.attend = _Launch(fn, (0, b, 1), blocks, ints, (*consts, False) if not union else consts, types)
        # the same launch reading and writing rows through tensor descriptors, where every
        # item's rows are 16-byte aligned (the pointers too: checked per call)
        self.tma = None
        tma_blocks = None if union else forward_descriptor_blocks(q, blocks)
        if tma_blocks is not None and descriptor_strides(
                q.element_size(), d, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *target_strides[:3]):
            self.tma = _Launch(fn, (0, b, 1), tma_blocks, ints, (*consts, True), types)
        self.merge = None
        if compact:
            self.merge = _Launch(
                kern.merge_kernel, (-(-n // MERGE_BLOCK), h, b), _MERGE_LAUNCH,
                (n, target_strides[0], target_strides[1], target_lse_strides[0], target_lse_strides[1],
                 *self.out_strides[:3], *self.lse_strides),
                (plan.n_patterns, MERGE_BLOCK, d),
                (q.dtype, torch.float32, q.dtype, torch.float32, torch.int32),
            )

    def _bind(self, device: torch.device) -> WorkList:
        wl = super()._bind(device)
        if self.tma is not None:
            self.tma.grid = self.attend.grid
        return wl

    def launches(self) -> list[_Launch]:
        return [x for x in (self.tma or self.attend, self.merge) if x is not None]

    def _attend(self, q, k, v, traced: bool) -> _Launch:
        """The item launch of this call: through tensor descriptors where they serve it."""
        if self.tma is None or traced or (q.data_ptr() | k.data_ptr() | v.data_ptr()) % 16:
            return self.attend
        if q.is_cuda:
            if q.device.index != torch.cuda.current_device():  # descriptor memory comes from the current one
                return self.attend
            allocator_ready()
        return self.tma

    def __call__(self, scale: float, q, k, v, traced: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        wl = self._bind(q.device)
        out = seq_major_storage(self.out_shape, q.dtype, q.device)
        lse = seq_major_storage(self.lse_shape, torch.float32, q.device)
        if self.empty:
            return _seq_major(out.zero_()), _seq_major(lse.fill_(-math.inf))
        stream = TRACED if traced else _stream(q.device)
        attend = self._attend(q, k, v, traced)
        if self.merge is None:
            attend((q, k, v), (q, k, v, out, lse, wl.items, scale), stream)
        else:
            target = torch.empty(self.target_shape, dtype=q.dtype, device=q.device)
            target_lse = torch.empty(self.target_shape[:3], dtype=torch.float32, device=q.device)
            attend((q, k, v), (q, k, v, target, target_lse, wl.items, scale), stream)
            self.merge((target,), (target, target_lse, out, lse, wl.patterns), stream)
        return _seq_major(out), _seq_major(lse)


class _BackwardCall(_Call):
    """The work-list backward of one call signature, decided once (see `_ForwardCall`)."""

    def __init__(self, plan: Plan, causal: bool, q, k, v, out, lse, dout):
        b, h, n, d = q.shape
        union = runs_as_union(plan, causal, backward=True)
        super().__init__(plan, causal, b, backward_blocks(q, union), union)
        blocks = self.blocks
        self.shape, self.strides = tuple(q.shape), seq_major_strides(q.shape)
        self.delta_shape = (b, h, n)
        delta_strides = _strides(self.delta_shape)
        numel = b * n * h * d
        # longnet: the patterns' gradients are summed in three fp32 (B, N, H, D) buffers, zeroed
        # by `prepare` and cast by `cast` (three buffers, not views of one: a kernel recorded
        # into a traced graph may not write views of one buffer)
        compact = self.compact
        target_dtype = torch.float32 if compact else q.dtype
        kern = _backward_kernels()
        self.prepare = _Launch(
            kern.prepare_kernel, (-(-n // PREPARE_BLOCK), h, b), _PREPARE_LAUNCH,
            (n, *dout.stride()[:3], *out.stride()[:3], *delta_strides), (compact, PREPARE_BLOCK, d),
            (dout.dtype, out.dtype, *(torch.float32,) * 4),  # delta, and the sums (or delta again)
        )
        fn, mode = kern.backward_kernel, (causal, compact)
        if union:
            fn, mode = _union_kernels().union_backward_kernel, (plan.n_patterns, causal)
        self.attend = _Launch(
            fn, (0, b, 1), blocks,  # (items, batch): items set on the first call
            (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *dout.stride()[:3],
             *lse.stride(), *delta_strides, *self.strides[:3]),
            (*mode, blocks.block_m, blocks.block_n, d, q.dtype == torch.float32),
            (q.dtype, k.dtype, v.dtype, dout.dtype, torch.float32, torch.float32, *(target_dtype,) * 3,
             torch.int32, float),
        )
        self.cast = None
        if compact:
            self.cast = _Launch(kern.cast_kernel, (-(-numel // CAST_BLOCK), 3, 1), _CAST_LAUNCH, (numel,),
                                (CAST_BLOCK,), (*(torch.float32,) * 3, *(q.dtype,) * 3))

    def launches(self) -> list[_Launch]:
        return [x for x in (self.prepare, self.attend, self.cast) if x is not None]

    def __call__(self, scale: float, q, k, v, out, lse, dout, traced: bool = False) -> tuple[torch.Tensor, ...]:
        wl = self._bind(q.device)
        if self.empty:
            return tuple(_seq_major(seq_major_storage(self.shape, q.dtype, q.device).zero_())
                         for _ in range(3))
        stream = TRACED if traced else _stream(q.device)
        delta = torch.empty(self.delta_shape, dtype=torch.float32, device=q.device)
        grads = tuple(seq_major_storage(self.shape, q.dtype, q.device) for _ in range(3))
        if self.cast is None:
            targets, sums = grads, (delta,) * 3  # prepare writes no sums
        else:
            targets = sums = tuple(seq_major_storage(self.shape, torch.float32, q.device) for _ in range(3))
        self.prepare((dout, out), (dout, out, delta, *sums), stream)
        self.attend((q, k, v, dout, lse), (q, k, v, dout, lse, delta, *targets, wl.items, scale), stream)
        if self.cast is not None:
            self.cast((sums[0], grads[0]), (*sums, *grads), stream)
        return tuple(_seq_major(g) for g in grads)


# Prepared calls by (id of the plan, causality, every shape and stride the launches
# read, dtype, device, block-size setting); each entry keeps its plan, so a reused id
# cannot match.
_CALLS: dict[tuple, tuple[Plan, object]] = {}
_CALLS_MAX = 512


def _prepared(kind: type, plan: Plan, causal: bool, tensors: tuple, variable: str):
    key = (kind, id(plan), causal, os.environ.get(variable), os.environ.get(UNION_SETTING),
           os.environ.get(TMA_SETTING), tensors[0].dtype,
           tensors[0].device, tensors[0].shape, *(t.stride() for t in tensors))
    hit = _CALLS.get(key)
    if hit is not None and hit[0] is plan:
        return hit[1]
    call = kind(plan, causal, *tensors)
    if len(_CALLS) >= _CALLS_MAX:
        _CALLS.clear()
    _CALLS[key] = (plan, call)
    return call


def forward(plan: Plan, is_causal: bool, scale: float, q, k, v, *, traced: bool = False):
    """(out, lse) of the dilated attention `plan` describes, as `compute.dilated_forward`
    returns them: out (B, H, N, D) in q's dtype and lse (B, H, N) float32, both stored
    sequence-major; out 0 and lse -inf where no pattern selects a position. `traced`:
    the launches are recorded into the graph being traced instead of run."""
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    call = _prepared(_ForwardCall, plan, bool(is_causal), (q, k, v), FORWARD_SETTING)
    return call(float(scale), q, k, v, traced)


def backward(plan: Plan, is_causal: bool, scale: float, q, k, v, out, lse, dout, *, traced: bool = False):
    """(dq, dk, dv) of the dilated attention `plan` describes from its (merged) out and
    lse, as `compute.dilated_backward` returns them (stored sequence-major); `traced` as
    for `forward`."""
    q, k, v, out, dout = (_unit_last(x) for x in (q, k, v, out, dout))
    call = _prepared(_BackwardCall, plan, bool(is_causal), (q, k, v, out, lse, dout), BACKWARD_SETTING)
    return call(float(scale), q, k, v, out, lse, dout, traced)


def forward_launches(plan: Plan, is_causal: bool, q, k, v) -> list[precompile.KernelLaunch]:
    """The kernel launches of `forward`'s first call with tensors like these (real or fake)."""
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    return [x.kernel_launch() for x in _ForwardCall(plan, bool(is_causal), q, k, v).launches()]


def backward_launches(plan: Plan, is_causal: bool, q, k, v, out, lse, dout) -> list[precompile.KernelLaunch]:
    """The kernel launches of `backward`'s first call with tensors like these (real or fake)."""
    q, k, v, out, dout = (_unit_last(x) for x in (q, k, v, out, dout))
    call = _BackwardCall(plan, bool(is_causal), q, k, v, out, lse, dout)
    return [x.kernel_launch() for x in call.launches()]
