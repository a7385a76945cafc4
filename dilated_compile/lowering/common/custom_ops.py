"""What the package's opaque custom ops share: their namespace, outputs stored
sequence-major ((B, N, H, D) seen as (B, H, N, D), the layout each op's fake
implementation promises and its real one returns), autograd from a
backward op that starts from the saved output and log-sum-exp, and how ops
whose kernels keep per-plan device tensors stay out of CUDA graphs.
"""

from __future__ import annotations

import torch

from .storage import accumulation_dtype, seq_major_empty, seq_major_strides

__all__ = [
    "OP_NAMESPACE",
    "RUNS_OUTSIDE_CUDA_GRAPHS",
    "refuse_capture_of_first_call",
    "in_seq_major",
    "lse_fake",
    "register_backward_from_lse",
    "seq_major_empty",
    "zeros_like_seq_major",
]

OP_NAMESPACE = "dilated_compile"

# The tags of an op whose kernels keep per-plan device tensors (the combine's descriptors,
# the work list's items), made on a plan's first call and kept for later ones. Made during
# a CUDA graph's warm-up or recording, they would live in the graph's private memory pool,
# which the graph owns and reuses: so under CUDA graphs (mode="reduce-overhead") such an
# op runs between the graphs Inductor partitions around it, never inside one.
RUNS_OUTSIDE_CUDA_GRAPHS = (torch.Tag.cudagraph_unsafe,)


def refuse_capture_of_first_call(device: torch.device) -> None:
    """Raise if a plan's per-plan device tensors are about to be made inside a CUDA
    graph capture on `device` (they would land in the graph's memory pool)."""
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            "dilated attention: the first call of a shape ran inside a CUDA graph capture; "
            "run the model once before capturing (torch.compile's CUDA graphs do so)"
        )


def zeros_like_seq_major(x: torch.Tensor) -> torch.Tensor:
    """Zeros shaped like `x`, stored sequence-major."""
    return seq_major_empty(x, x.shape, x.dtype).zero_()


def in_seq_major(t: torch.Tensor) -> torch.Tensor:
    """`t` itself when it is stored (B, N, H, X), else a sequence-major copy."""
    if t.stride() == seq_major_strides(t.shape):
        return t
    out = seq_major_empty(t, t.shape, t.dtype)
    out.copy_(t)
    return out


def lse_fake(q: torch.Tensor) -> torch.Tensor:
    return seq_major_empty(q, q.shape[:3], accumulation_dtype(q))


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
