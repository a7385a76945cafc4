"""`dilated_attention`: the function a rewritten dilated site with static lengths
runs, and the eager entry point (docs/spec.md, "Dilated attention" and "API").

On CPU (and wherever the Triton combine does not run) it is one autograd node
around `compute.dilated_forward` / `dilated_backward`, which Inductor traces
into fused kernels; on CUDA in fp16, bf16 and fp32 it is the opaque custom op
of `op.py`, or, traced for Inductor where the work list runs it, the work list's
launches themselves (`inline.py`).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from ..common import combine
from ..common.autograd_output import returned_output
from ..common.checks import check_qkv
from . import inline
from .compute import dilated_backward, dilated_forward
from .op import dilated_attention_op
from .arguments import check_dilated_args, encode_parameters
from .plan import Plan, plan_for


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
    """Dilated attention of (batch, heads, seq, head_dim) tensors (docs/spec.md, "Dilated attention").

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
        pattern = encode_parameters(seg, rates, head_split)
        if inline.applies(q, pattern, is_causal):  # traced for Inductor: the graph launches the kernels
            out, _ = inline.worklist_attention(q, k, v, pattern, bool(is_causal), float(scale))
        else:
            out, _ = dilated_attention_op(q, k, v, pattern, bool(is_causal), float(scale), 0)
        return out
    plan = plan_for(q, seg, rates, head_split)
    return _DilatedAttention.apply(plan, bool(is_causal), float(scale), q, k, v)
