"""Dilated attention as one opaque custom op: for sites whose sequence length
is symbolic (dynamic shapes), and for every dilated attention on CUDA in
fp16, bf16 or fp32 (`attention.dilated_attention` routes there; see `common/combine.py`).

A rewritten site with a symbolic length calls an opaque custom op
(``torch.ops.dilated_compile.dilated_attention``). Its fake implementation only
gives the output's shape and layout, so tracing adds no guard on the length
and one compiled graph serves every length; its real implementation runs the
eager lowering with the concrete length at run time (the plan for each length
is cached by `plan.make_plan`, a bounded cache). The backward is a second
custom op that runs the lowering's backward from the saved output and
log-sum-exp.

The policy's ``min_seq_len`` cannot be decided when the graph is compiled, so
it is decided per call: below it the op computes ordinary attention, as the
one pattern ``w = N, r = 1`` (the identity in docs/spec.md, "Dilated attention").

Outputs are stored sequence-major, (B, N, H, D) seen as (B, H, N, D): the
layout the fake implementation promises and the real one returns.
"""

from __future__ import annotations

import logging
import math
import os
from typing import NamedTuple, Sequence

import torch

from ..common.checks import check_qkv
from ..common.custom_ops import (
    OP_NAMESPACE,
    RUNS_OUTSIDE_CUDA_GRAPHS,
    in_seq_major,
    lse_fake,
    register_backward_from_lse,
    seq_major_empty,
    zeros_like_seq_major,
)
from ..common.view_replay import opaque_op, without_view_replay
from ..common import combine, precompile
from . import plan as plan_module
from . import worklist
from .arguments import decode_parameters, encode_parameters
from .compute import dilated_backward, dilated_forward, gathered_launches
from .kernel_choice import WORKLIST, choose
from .plan import Plan, plan_for

log = logging.getLogger(__name__)


def effective_pattern(
    seq_len: int, segment_lengths: Sequence[int], dilation_rates: Sequence[int], min_seq_len: int
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The (segments, rates) to run at `seq_len`: the rule's, or dense below `min_seq_len`."""
    if seq_len < min_seq_len:
        return (max(seq_len, 1),), (1,)
    return tuple(segment_lengths), tuple(dilation_rates)


class _Route(NamedTuple):
    """What a call of the op runs: its plan, and whether its forward and its backward
    run the work list (else `compute.dilated_forward` / `dilated_backward` decide)."""

    plan: Plan
    worklist_forward: bool
    worklist_backward: bool


# Routes by everything `plan_for`, `combine.runs_on` and `kernel_choice.choose` read of a
# call: the op's arguments, q's shape, dtype and device, and the settings that pick the
# kernels. Looked up on every call of the op, so that a call does no more Python than
# the lookup before the kernels it runs.
_ROUTES: dict[tuple, _Route] = {}
_ROUTES_MAX = 256
_SETTINGS = ("DILATED_KERNEL", "DILATED_WORKLIST", "DILATED_COMBINE")


def make_route(q: torch.Tensor, pattern: str, is_causal: bool, min_seq_len: int, combine_runs: bool) -> _Route:
    """The `_Route` of a call with tensors like `q` (real or fake); `combine_runs`: whether
    the Triton kernels serve it (else the plan's own lowering decides)."""
    spec = decode_parameters(pattern)
    seg, rates = effective_pattern(q.shape[2], spec.segment_lengths, spec.dilation_rates, min_seq_len)
    plan = plan_for(q, seg, rates, spec.head_split)
    choice = choose(plan, q, is_causal) if combine_runs else None
    return _Route(plan, choice is not None and choice.forward == WORKLIST,
                  choice is not None and choice.backward == WORKLIST)


def _kernel_settings(q: torch.Tensor) -> tuple:
    """The settings besides a call's arguments that pick its plan and kernels."""
    env = os.environ
    return (*(env.get(s) for s in _SETTINGS), q.is_cuda and torch.backends.cuda.cudnn_sdp_enabled(),
            plan_module.SMALL_PART_TILES)


def _route(q: torch.Tensor, pattern: str, is_causal: bool, min_seq_len: int) -> _Route:
    key = (pattern, min_seq_len, is_causal, q.shape, q.dtype, q.device, *_kernel_settings(q))
    route = _ROUTES.get(key)
    if route is None:
        route = make_route(q, pattern, is_causal, min_seq_len, combine.runs_on(q))
        if len(_ROUTES) >= _ROUTES_MAX:
            _ROUTES.clear()
        _ROUTES[key] = route
    return route


# Call signatures (and Triton cache directories) whose launches were handed to the compile
# workers or could not be listed: the fake implementation runs several times per site
# while a graph compiles (tracing, the joint graph, Inductor's lowering), and listing the
# gathered blocks' launches runs that path on fake tensors (16-26 ms for LongNet at 64k).
_LISTED: dict[tuple, None] = {}
_LISTED_MAX = 512


def _precompile(tensors: tuple, pattern: str, is_causal: bool, scale: float, min_seq_len: int) -> None:
    """Start compiling the Triton kernels that the first real call with tensors like the
    fake `tensors` ((q, k, v) forward, (q, k, v, out, lse, dout) backward) will launch
    (see `precompile`), once per call signature."""
    q = tensors[0]
    concrete = all(type(x) is int for t in tensors for x in (*t.shape, *t.stride()))
    if not concrete or q.shape[2] == 0 or not combine.usable(q) or not precompile.ready(q.device):
        return
    key = (pattern, bool(is_causal), float(scale), int(min_seq_len), q.device,
           *((t.shape, t.stride(), t.dtype) for t in tensors), *_kernel_settings(q),
           os.environ.get("TRITON_CACHE_DIR"))
    if key in _LISTED:
        return
    if len(_LISTED) >= _LISTED_MAX:
        _LISTED.clear()
    try:
        route = make_route(q, pattern, is_causal, min_seq_len, True)
        if len(tensors) == 3:
            launches = (worklist.forward_launches(route.plan, is_causal, *tensors) if route.worklist_forward
                        else gathered_launches(route.plan, is_causal, scale, tensors))
        else:
            launches = (worklist.backward_launches(route.plan, is_causal, *tensors) if route.worklist_backward
                        else gathered_launches(route.plan, is_causal, scale, tensors))
    except Exception as e:  # an optimisation only: the real call raises what is wrong
        log.info("dilated_compile: kernels compile at their first launch (%s: %s)", type(e).__name__, e)
        _LISTED[key] = None
        return
    if precompile.submit(q.device, launches):
        _LISTED[key] = None


def _forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: str,
    is_causal: bool,
    scale: float,
    min_seq_len: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) of dilated attention at the run-time length (dense below min_seq_len);
    `pattern` as `arguments.encode_parameters` writes it."""
    if q.shape[2] == 0:
        return zeros_like_seq_major(q), lse_fake(q).fill_(-math.inf)
    route = _route(q, pattern, is_causal, min_seq_len)
    if route.worklist_forward:  # stored sequence-major already
        return worklist.forward(route.plan, is_causal, scale, q, k, v)
    out, lse = dilated_forward(route.plan, is_causal, scale, q, k, v)
    return in_seq_major(out), in_seq_major(lse)


dilated_attention_op = opaque_op(f"{OP_NAMESPACE}::dilated_attention", tags=RUNS_OUTSIDE_CUDA_GRAPHS)(_forward)


@dilated_attention_op.register_fake
def _(q, k, v, pattern, is_causal, scale, min_seq_len):
    _precompile((q, k, v), pattern, is_causal, scale, min_seq_len)
    return seq_major_empty(q, q.shape, q.dtype), lse_fake(q)


def _backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    pattern: str,
    is_causal: bool,
    scale: float,
    min_seq_len: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of `dilated_attention_op` from its saved out and lse."""
    if q.shape[2] == 0:
        return tuple(zeros_like_seq_major(x) for x in (q, k, v))
    route = _route(q, pattern, is_causal, min_seq_len)
    if route.worklist_backward:  # stored sequence-major already
        return worklist.backward(route.plan, is_causal, scale, q, k, v, out, lse, dout)
    grads = dilated_backward(route.plan, is_causal, scale, q, k, v, out, lse, dout)
    return tuple(in_seq_major(g) for g in grads)


dilated_attention_backward_op = opaque_op(
    f"{OP_NAMESPACE}::dilated_attention_backward", tags=RUNS_OUTSIDE_CUDA_GRAPHS)(_backward)


@dilated_attention_backward_op.register_fake
def _(dout, q, k, v, out, lse, pattern, is_causal, scale, min_seq_len):
    _precompile((q, k, v, out, lse, dout), pattern, is_causal, scale, min_seq_len)
    return tuple(seq_major_empty(x, x.shape, x.dtype) for x in (q, k, v))


register_backward_from_lse(dilated_attention_op, dilated_attention_backward_op)

# The same implementations at the CUDA dispatch key: the dispatcher then calls them
# directly instead of through custom_op's Python wrapper of its default kernel (output
# alias checks, a Dynamo-disabling frame), which halved the op's host time in a
# measurement on the CPU. Autograd and the fake implementations are the custom op's.
_CUDA_KERNELS = torch.library.Library(OP_NAMESPACE, "IMPL")
_CUDA_KERNELS.impl("dilated_attention", without_view_replay(_forward), "CUDA")
_CUDA_KERNELS.impl("dilated_attention_backward", without_view_replay(_backward), "CUDA")


def dynamic_dilated_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    *,
    head_split: str = "groups",
    is_causal: bool = False,
    scale: float | None = None,
    min_seq_len: int = 0,
) -> torch.Tensor:
    """Dilated attention of (B, H, N, D) tensors through the custom op: any N, no guard on N.

    The same function as `dilated_attention` at lengths >= `min_seq_len`, and
    ordinary attention below it. Differentiable.
    """
    pattern = encode_parameters(segment_lengths, dilation_rates, head_split)
    check_qkv(q, k, v)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    out, _ = dilated_attention_op(q, k, v, pattern, bool(is_causal), float(scale), int(min_seq_len))
    return out
