"""Block-sparse attention (docs/spec.md, "Block-sparse attention"): the function a rewritten site runs.

On CUDA in fp16/bf16 it is FlexAttention with a BlockMask (Inductor's Triton
template, forward and backward); elsewhere (CPU, float32 and float64 on CUDA)
the gathered key-block lowering of `gather.py`, which trains everywhere.
FlexAttention's float32 backward misses the tolerance rule (docs/spec.md, "Qualities that hold everywhere")
for the key/value gradients of global columns (dv 7.5e-6 against an allowed
6.1e-6 at N=1000 on an H200, torch 2.11), so float32 takes the exact path.
``DILATED_BLOCK_SPARSE=flex|gather`` forces one.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping

import torch

from ...policy.specs import BlockPattern
from .flex import flex_block_sparse
from .gather import gather_block_sparse
from .patterns import as_pattern
from ..common.checks import check_qkv

PATHS = ("flex", "gather")


def choose_path(q: torch.Tensor) -> str:
    """`flex` or `gather`: which lowering runs block-sparse attention on `q`."""
    forced = os.environ.get("DILATED_BLOCK_SPARSE")
    if forced:
        if forced not in PATHS:
            raise ValueError(f"DILATED_BLOCK_SPARSE={forced!r}: expected one of {', '.join(PATHS)}")
        return forced
    if q.device.type == "cuda" and q.dtype in (torch.float16, torch.bfloat16):
        return "flex"
    return "gather"


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    block_size: int,
    pattern: BlockPattern | Mapping | Callable,
    is_causal: bool = False,
    scale: float | None = None,
) -> torch.Tensor:
    """Block-sparse attention of (batch, heads, seq, head_dim) tensors.

    `pattern` is a policy `BlockPattern`, a mapping like
    ``{"kind": "local_window", "window": 2}`` or a FlexAttention-style
    ``mask_mod(b, h, q_idx, kv_idx)``. Causal masking is per token on global
    positions; a query with no allowed key gets 0 (and gradient 0).
    Differentiable; the same function the compiled rewrite runs.
    """
    pattern = as_pattern(pattern, block_size)
    check_qkv(q, k, v)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    if q.shape[2] == 0:
        return q.new_zeros(q.shape)
    run = flex_block_sparse if choose_path(q) == "flex" else gather_block_sparse
    return run(q, k, v, pattern, block_size, bool(is_causal), float(scale))
