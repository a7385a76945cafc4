"""How the package's attention results are stored: sequence-major layout and the
accumulation dtype."""

from __future__ import annotations

import torch


def seq_major_strides(shape) -> tuple:
    """Strides of a (B, H, N[, X]) tensor stored as (B, N, H[, X]) (works on symbolic sizes)."""
    if len(shape) == 3:
        b, h, n = shape
        return (n * h, 1, h)
    b, h, n, x = shape
    return (n * h * x, x, h * x, 1)


def seq_major_empty(like: torch.Tensor, shape, dtype: torch.dtype) -> torch.Tensor:
    """An empty (B, H, N[, X]) tensor on `like`'s device, stored as (B, N, H[, X])."""
    return like.new_empty_strided(tuple(shape), seq_major_strides(shape), dtype=dtype)


def seq_major_storage(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The (B, N, H[, X]) storage of a new (B, H, N[, X]) tensor, seen as it by
    ``.transpose(1, 2)``, for kernels that take the storage. A plain ``empty``, unlike
    `seq_major_empty`: a traced graph merges identical ``empty_strided`` calls into one
    buffer, which each kernel writing it would first copy."""
    b, h, n, *rest = shape
    return torch.empty((b, n, h, *rest), dtype=dtype, device=device)


def accumulation_dtype(q: torch.Tensor) -> torch.dtype:
    """float64 for float64 inputs, else float32: the dtype of log-sum-exps and sums."""
    return torch.float64 if q.dtype == torch.float64 else torch.float32
