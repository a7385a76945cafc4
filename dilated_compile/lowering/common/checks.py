"""Argument checks every attention function makes on q, k, v."""

from __future__ import annotations

import torch


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Raise if q, k, v are not (batch, heads, seq, dim) self-attention tensors."""
    if q.dim() != 4 or k.shape != q.shape or v.shape[:-1] != q.shape[:-1]:
        raise ValueError(
            "expected q, k, v of shape (batch, heads, seq, head_dim) with equal batch, heads "
            f"and sequence length; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if v.shape[-1] != q.shape[-1]:
        raise ValueError(
            f"value head_dim {v.shape[-1]} differs from query head_dim {q.shape[-1]}: "
            "not supported"
        )
