"""The work list as Triton launches of the compiled graph (see `common/inlining.py`).

`worklist_attention` is a ``torch.library.triton_op``: AOTAutograd traces its
body, so the work list's launches become user-defined Triton kernels in the
graph that Inductor compiles with the rest and launches from its generated
code; the work items are constants of the graph. Its backward is
`worklist_attention_backward` (the same kind of op) where the kernel choice
picks the work list for the backward; otherwise the opaque backward op of
`op.py`.

Used, with ``DILATED_INLINE=on``, for sites with static shapes on CUDA whose
forward the kernel choice gives to the work list, while the backend compiles
with Inductor.
"""

from __future__ import annotations

import torch
from torch.library import triton_op

from ..common.combine import usable
from ..common.custom_ops import register_backward_from_lse
from ..common.inlining import inlining_on
from . import worklist


def _route(q: torch.Tensor, pattern: str, is_causal: bool):
    from .op import make_route  # the op's module imports the kernels' choice and plans

    return make_route(q, pattern, is_causal, 0, True)


def applies(q: torch.Tensor, pattern: str, is_causal: bool) -> bool:
    """Whether a traced dilated site of tensors like `q` runs `worklist_attention`."""
    if not inlining_on() or not usable(q) or not all(type(x) is int for x in (*q.shape, *q.stride())):
        return False
    return _route(q, pattern, is_causal).worklist_forward


@triton_op("dilated_compile::worklist_attention", mutates_args=())
def worklist_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: str, is_causal: bool, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) of the dilated attention `pattern` encodes, by the work list's kernels,
    stored sequence-major as `op.dilated_attention_op` returns them."""
    plan = _route(q, pattern, is_causal).plan
    return worklist.forward(plan, is_causal, scale, q, k, v, traced=True)


@triton_op("dilated_compile::worklist_attention_backward", mutates_args=())
def worklist_attention_backward(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
    lse: torch.Tensor, pattern: str, is_causal: bool, scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of `worklist_attention` from its out and lse, by the work list's kernels."""
    plan = _route(q, pattern, is_causal).plan
    return worklist.backward(plan, is_causal, scale, q, k, v, out, lse, dout, traced=True)


def _backward(dout, q, k, v, out, lse, pattern: str, is_causal: bool, scale: float):
    from .op import dilated_attention_backward_op

    route = _route(q, pattern, is_causal)
    if route.worklist_backward:
        return worklist_attention_backward(dout, q, k, v, out, lse, pattern, is_causal, scale)
    return dilated_attention_backward_op(dout, q, k, v, out, lse, pattern, is_causal, scale, 0)


register_backward_from_lse(worklist_attention, _backward)
