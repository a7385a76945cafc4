"""Block-sparse attention for sites whose sequence length is symbolic (dynamic shapes).

The block-sparse counterpart of `dilated/op.py`: a rewritten site with a symbolic
length calls the opaque custom op ``torch.ops.dilated_compile.block_sparse_attention``.
Its fake implementation only gives the output's shape and layout (no guard on
the length, one graph for every length); its real implementation runs the eager
lowering of `attention.py` at the concrete length (`gather.py` on CPU and
in float32/float64, FlexAttention on CUDA in fp16/bf16) and returns (out, lse).
The backward is a second custom op: the gathered backward from the saved out
and lse, on both paths (FlexAttention has no backward that starts from a given
lse, and autograd is off inside a custom op's implementation).

The block size and pattern travel as one op argument, the canonical JSON that
`arguments.encode_parameters` writes (a ``mask_mod`` pattern's function as
the ``package.module:name`` string the policy gives, imported at run time),
parsed once per distinct text (cached).

``min_seq_len`` is decided per call: below it the op computes ordinary
attention, as a local window that covers every block.

Outputs are stored sequence-major like `dilated/op.py`'s.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch

from ...policy.specs import BlockPattern
from ..common.checks import check_qkv
from ..common.custom_ops import (
    OP_NAMESPACE,
    in_seq_major,
    lse_fake,
    seq_major_empty,
    zeros_like_seq_major,
    register_backward_from_lse,
)
from ..common.view_replay import opaque_op
from .arguments import decode_parameters, encode_parameters
from .attention import choose_path
from .flex import flex_block_sparse
from .gather import gather_block_sparse_backward, gather_block_sparse_with_lse

def effective_pattern(seq_len: int, block_size: int, pattern: BlockPattern, min_seq_len: int) -> BlockPattern:
    """The pattern to run at `seq_len`: the rule's, or every block (dense) below `min_seq_len`."""
    if seq_len < min_seq_len:
        return BlockPattern(kind="local_window", window=max(1, -(-seq_len // block_size)))
    return pattern


def _spec(q: torch.Tensor, pattern: str, min_seq_len: int) -> tuple[BlockPattern, int]:
    spec = decode_parameters(pattern)
    return effective_pattern(q.shape[2], spec.block_size, spec.pattern, min_seq_len), spec.block_size


@opaque_op(f"{OP_NAMESPACE}::block_sparse_attention")
def block_sparse_attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: str,
    is_causal: bool,
    scale: float,
    min_seq_len: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) of block-sparse attention at the run-time length (dense below min_seq_len);
    `pattern` as `arguments.encode_parameters` writes it."""
    if q.shape[2] == 0:
        return zeros_like_seq_major(q), lse_fake(q).fill_(-math.inf)
    blocks, block_size = _spec(q, pattern, min_seq_len)
    if choose_path(q) == "flex":
        out, lse = flex_block_sparse(q, k, v, blocks, block_size, is_causal, scale, return_lse=True)
    else:
        out, lse = gather_block_sparse_with_lse(q, k, v, blocks, block_size, is_causal, scale)
    return in_seq_major(out), in_seq_major(lse.to(lse_fake(q).dtype))


@block_sparse_attention_op.register_fake
def _(q, k, v, pattern, is_causal, scale, min_seq_len):
    return seq_major_empty(q, q.shape, q.dtype), lse_fake(q)


@opaque_op(f"{OP_NAMESPACE}::block_sparse_attention_backward")
def block_sparse_attention_backward_op(
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
    """(dq, dk, dv) of `block_sparse_attention_op` from its saved out and lse."""
    if q.shape[2] == 0:
        return tuple(zeros_like_seq_major(x) for x in (q, k, v))
    blocks, block_size = _spec(q, pattern, min_seq_len)
    # Both paths: the gathered backward from out and lse (FlexAttention has no backward that
    # starts from a given lse, and autograd is off inside a custom op's implementation).
    grads = gather_block_sparse_backward(q, k, v, out, lse, dout, blocks, block_size, is_causal, scale)
    return tuple(in_seq_major(g) for g in grads)


@block_sparse_attention_backward_op.register_fake
def _(dout, q, k, v, out, lse, pattern, is_causal, scale, min_seq_len):
    return tuple(seq_major_empty(x, x.shape, x.dtype) for x in (q, k, v))


register_backward_from_lse(block_sparse_attention_op, block_sparse_attention_backward_op)


def dynamic_block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    block_size: int,
    pattern: BlockPattern | Mapping | Callable,
    is_causal: bool = False,
    scale: float | None = None,
    min_seq_len: int = 0,
) -> torch.Tensor:
    """Block-sparse attention of (B, H, N, D) tensors through the custom op: any N, no guard on N.

    The same function as `block_sparse_attention` at lengths >= `min_seq_len`,
    and ordinary attention below it. Differentiable.
    """
    text = encode_parameters(block_size, pattern)
    check_qkv(q, k, v)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    out, _ = block_sparse_attention_op(q, k, v, text, bool(is_causal), float(scale), int(min_seq_len))
    return out
