"""Dilated attention as one opaque custom op: for sites whose sequence length
is symbolic (dynamic shapes), and for every dilated attention on CUDA in
fp16, bf16 or fp32 (`dilated.dilated_attention` routes there; see `combine.py`).

A rewritten site with a symbolic length calls an opaque custom op
(``torch.ops.dilated_compile.dilated_attention``). Its fake implementation only
gives the output's shape and layout, so tracing adds no guard on the length
and one compiled graph serves every length; its real implementation runs the
eager lowering with the concrete length at run time (the plan for each length
is cached by `dilated.make_plan`, a bounded cache). The backward is a second
custom op that runs the lowering's backward from the saved output and
log-sum-exp.

The policy's ``min_seq_len`` cannot be decided when the graph is compiled, so
it is decided per call: below it the op computes ordinary attention, as the
one pattern ``w = N, r = 1`` (SPEC section 3's identity).

Outputs are stored sequence-major, (B, N, H, D) seen as (B, H, N, D): the
layout the fake implementation promises and the real one returns.
"""

import math
from typing import Sequence

import torch

from .dilated import check_dilated_args, check_qkv, dilated_backward, dilated_forward, plan_for
from .kernels import accumulation_dtype
from .kernels import seq_major_empty as _seq_major_empty
from .kernels import seq_major_strides as _seq_major_strides
from .view_replay import opaque_op

OP_NAMESPACE = "dilated_compile"


def _zeros_like_seq_major(x: torch.Tensor) -> torch.Tensor:
    """Zeros shaped like `x`, stored sequence-major."""
    return _seq_major_empty(x, x.shape, x.dtype).zero_()


def _in_seq_major(t: torch.Tensor) -> torch.Tensor:
    """`t` itself when it is stored (B, N, H, X), else a sequence-major copy."""
    if t.stride() == _seq_major_strides(t.shape):
        return t
    out = _seq_major_empty(t, t.shape, t.dtype)
    out.copy_(t)
    return out


def _lse_fake(q: torch.Tensor) -> torch.Tensor:
    return _seq_major_empty(q, q.shape[:3], accumulation_dtype(q))


def effective_pattern(
    seq_len: int, segment_lengths: Sequence[int], dilation_rates: Sequence[int], min_seq_len: int
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The (segments, rates) to run at `seq_len`: the rule's, or dense below `min_seq_len`."""
    if seq_len < min_seq_len:
        return (max(seq_len, 1),), (1,)
    return tuple(segment_lengths), tuple(dilation_rates)


def _plan(q, segment_lengths, dilation_rates, head_split, min_seq_len):
    seg, rates = effective_pattern(q.shape[2], segment_lengths, dilation_rates, min_seq_len)
    return plan_for(q, seg, rates, head_split)


@opaque_op(f"{OP_NAMESPACE}::dilated_attention")
def dilated_attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    segment_lengths: list[int],
    dilation_rates: list[int],
    head_split: str,
    is_causal: bool,
    scale: float,
    min_seq_len: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) of dilated attention at the run-time length (dense below min_seq_len)."""
    if q.shape[2] == 0:
        return _zeros_like_seq_major(q), _lse_fake(q).fill_(-math.inf)
    plan = _plan(q, segment_lengths, dilation_rates, head_split, min_seq_len)
    out, lse = dilated_forward(plan, is_causal, scale, q, k, v)
    return _in_seq_major(out), _in_seq_major(lse)


@dilated_attention_op.register_fake
def _(q, k, v, segment_lengths, dilation_rates, head_split, is_causal, scale, min_seq_len):
    return _seq_major_empty(q, q.shape, q.dtype), _lse_fake(q)


@opaque_op(f"{OP_NAMESPACE}::dilated_attention_backward")
def dilated_attention_backward_op(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    segment_lengths: list[int],
    dilation_rates: list[int],
    head_split: str,
    is_causal: bool,
    scale: float,
    min_seq_len: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of `dilated_attention_op` from its saved out and lse."""
    if q.shape[2] == 0:
        return tuple(_zeros_like_seq_major(x) for x in (q, k, v))
    plan = _plan(q, segment_lengths, dilation_rates, head_split, min_seq_len)
    grads = dilated_backward(plan, is_causal, scale, q, k, v, out, lse, dout)
    return tuple(_in_seq_major(g) for g in grads)


@dilated_attention_backward_op.register_fake
def _(dout, q, k, v, out, lse, segment_lengths, dilation_rates, head_split, is_causal, scale, min_seq_len):
    return tuple(_seq_major_empty(x, x.shape, x.dtype) for x in (q, k, v))


def register_backward_from_lse(forward_op, backward_op) -> None:
    """Autograd for `forward_op(q, k, v, *params) -> (out, lse)` through
    `backward_op(dout, q, k, v, out, lse, *params) -> (dq, dk, dv)`: q, k, v, out
    and lse are saved; lse is not differentiable; params get no gradient."""

    def setup_context(ctx, inputs, output):
        q, k, v, *params = inputs
        out, lse = output
        ctx.mark_non_differentiable(lse)
        ctx.set_materialize_grads(False)  # no zeros for lse's gradient, which is unused
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.params = params

    def backward(ctx, dout, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        if dout is None:  # not materialised: out got no gradient
            dout = torch.zeros_like(out)
        dq, dk, dv = backward_op(dout, q, k, v, out, lse, *ctx.params)
        return dq, dk, dv, *([None] * len(ctx.params))

    forward_op.register_autograd(backward, setup_context=setup_context)


register_backward_from_lse(dilated_attention_op, dilated_attention_backward_op)


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
    seg, rates = check_dilated_args(segment_lengths, dilation_rates, head_split)
    check_qkv(q, k, v)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    out, _ = dilated_attention_op(
        q, k, v, list(seg), list(rates), head_split, bool(is_causal), float(scale), int(min_seq_len)
    )
    return out
