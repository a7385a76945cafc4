"""Block-sparse attention for sites whose sequence length is symbolic (dynamic shapes).

The block-sparse counterpart of `dynamic.py`: a rewritten site with a symbolic
length calls the opaque custom op ``torch.ops.dilated_compile.block_sparse_attention``.
Its fake implementation only gives the output's shape and layout (no guard on
the length, one graph for every length); its real implementation runs the eager
lowering of `block_sparse.py` at the concrete length (`block_gather` on CPU and
in float32/float64, FlexAttention on CUDA in fp16/bf16) and returns (out, lse).
The backward is a second custom op: the gathered backward from the saved out
and lse, on both paths (FlexAttention has no backward that starts from a given
lse, and autograd is off inside a custom op's implementation).

The pattern travels as op arguments (kind, window, stride, global_blocks; -1
for a field the kind has no use for; and a ``mask_mod`` pattern's function as
the ``package.module:name`` string the policy gives, imported at run time).

``min_seq_len`` is decided per call: below it the op computes ordinary
attention, as a local window that covers every block.

Outputs are stored sequence-major like `dynamic.py`'s.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch

from ..policy import BlockPattern
from .block_flex import flex_block_sparse
from .block_gather import gather_block_sparse_backward, gather_block_sparse_with_lse
from .block_patterns import as_pattern
from .block_sparse import choose_path
from .dilated import check_qkv
from .dynamic import (
    OP_NAMESPACE,
    _in_seq_major,
    _lse_fake,
    _seq_major_empty,
    _zeros_like_seq_major,
    register_backward_from_lse,
)
from .view_replay import opaque_op

_FIELDS = ("window", "stride", "global_blocks")


def pattern_args(pattern: BlockPattern) -> list:
    """[kind, window, stride, global_blocks, function]: the pattern as op arguments (-1 for
    an unused number, "" for no function; a mask_mod's function is its import path)."""
    numbers = (-1 if getattr(pattern, f) is None else int(getattr(pattern, f)) for f in _FIELDS)
    return [pattern.kind, *numbers, pattern.function or ""]


def effective_pattern(
    seq_len: int, block_size: int, kind: str, window: int, stride: int, global_blocks: int, function: str,
    min_seq_len: int,
) -> BlockPattern:
    """The pattern to run at `seq_len`: the rule's, or every block (dense) below `min_seq_len`."""
    if seq_len < min_seq_len:
        return BlockPattern(kind="local_window", window=max(1, -(-seq_len // block_size)))
    values = {f: (None if x < 0 else x) for f, x in zip(_FIELDS, (window, stride, global_blocks))}
    return BlockPattern(kind=kind, **values, function=function or None)


@opaque_op(f"{OP_NAMESPACE}::block_sparse_attention")
def block_sparse_attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_size: int,
    kind: str,
    window: int,
    stride: int,
    global_blocks: int,
    function: str,
    is_causal: bool,
    scale: float,
    min_seq_len: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) of block-sparse attention at the run-time length (dense below min_seq_len)."""
    if q.shape[2] == 0:
        return _zeros_like_seq_major(q), _lse_fake(q).fill_(-math.inf)
    pattern = effective_pattern(
        q.shape[2], block_size, kind, window, stride, global_blocks, function, min_seq_len
    )
    if choose_path(q) == "flex":
        out, lse = flex_block_sparse(q, k, v, pattern, block_size, is_causal, scale, return_lse=True)
    else:
        out, lse = gather_block_sparse_with_lse(q, k, v, pattern, block_size, is_causal, scale)
    return _in_seq_major(out), _in_seq_major(lse.to(_lse_fake(q).dtype))


@block_sparse_attention_op.register_fake
def _(q, k, v, block_size, kind, window, stride, global_blocks, function, is_causal, scale, min_seq_len):
    return _seq_major_empty(q, q.shape, q.dtype), _lse_fake(q)


@opaque_op(f"{OP_NAMESPACE}::block_sparse_attention_backward")
def block_sparse_attention_backward_op(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    block_size: int,
    kind: str,
    window: int,
    stride: int,
    global_blocks: int,
    function: str,
    is_causal: bool,
    scale: float,
    min_seq_len: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of `block_sparse_attention_op` from its saved out and lse."""
    if q.shape[2] == 0:
        return tuple(_zeros_like_seq_major(x) for x in (q, k, v))
    pattern = effective_pattern(
        q.shape[2], block_size, kind, window, stride, global_blocks, function, min_seq_len
    )
    # Both paths: the gathered backward from out and lse (FlexAttention has no backward that
    # starts from a given lse, and autograd is off inside a custom op's implementation).
    grads = gather_block_sparse_backward(q, k, v, out, lse, dout, pattern, block_size, is_causal, scale)
    return tuple(_in_seq_major(g) for g in grads)


@block_sparse_attention_backward_op.register_fake
def _(dout, q, k, v, out, lse, block_size, kind, window, stride, global_blocks, function, is_causal, scale,
      min_seq_len):
    return tuple(_seq_major_empty(x, x.shape, x.dtype) for x in (q, k, v))


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
    pattern = as_pattern(pattern, block_size)
    args = pattern_args(pattern)
    check_qkv(q, k, v)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    out, _ = block_sparse_attention_op(
        q, k, v, int(block_size), *args, bool(is_causal), float(scale), int(min_seq_len)
    )
    return out
