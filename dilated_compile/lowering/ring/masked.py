"""Attention of queries with a gathered set of keys under an explicit mask, and its backward.

The step of a block-sparse ring with a ``mask_mod`` pattern (a user's
token-level mask, which may depend on batch and head; built-in patterns run
as dense blocks, `dense_blocks`): each partial attention is one softmax over
the allowed (query, key) pairs given by a boolean mask on global positions.
The forward returns the output and the log-sum-exp of each row, so partials
merge by log-sum-exp; the backward takes the *merged* output and
log-sum-exp, which makes the gradient of the merge exact. A row with no
allowed key has output 0, log-sum-exp -inf and gradient 0 (never NaN).

Computed in the accumulation dtype (float32, float64 for float64 inputs).
"""

from __future__ import annotations

import math

import torch

from ..common.block_kernels import accumulation_dtype


def _scores(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    acc = accumulation_dtype(q)
    s = torch.matmul(q.to(acc), k.to(acc).transpose(-2, -1)) * scale
    return s.masked_fill(~mask, -math.inf)


def masked_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) in the accumulation dtype of q (B, H, m, D) against k, v (B, H, M, D).

    `mask` (broadcastable to (B, H, m, M), bool) says which pairs are allowed.
    No autograd: use `masked_attention_backward`.
    """
    acc = accumulation_dtype(q)
    if k.shape[-2] == 0:
        out = torch.zeros(q.shape[:-1] + v.shape[-1:], dtype=acc, device=q.device)
        return out, torch.full(q.shape[:-1], -math.inf, dtype=acc, device=q.device)
    s = _scores(q, k, mask, scale)
    top = s.amax(dim=-1, keepdim=True)
    top = torch.where(torch.isinf(top), torch.zeros_like(top), top)
    weights = torch.exp(s - top)
    total = weights.sum(dim=-1, keepdim=True)
    safe = torch.where(total > 0, total, torch.ones_like(total))
    out = torch.matmul(weights, v.to(acc)) / safe
    lse = torch.where(total > 0, top + torch.log(safe), torch.full_like(top, -math.inf))
    return out, lse.squeeze(-1)


def masked_attention_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) in the accumulation dtype, given the (possibly merged) out and lse."""
    acc = accumulation_dtype(q)
    if k.shape[-2] == 0:
        return (torch.zeros(q.shape, dtype=acc, device=q.device),
                torch.zeros(k.shape, dtype=acc, device=q.device),
                torch.zeros(v.shape, dtype=acc, device=q.device))
    s = _scores(q, k, mask, scale)
    p = torch.where(mask, torch.exp(s - lse.to(acc).unsqueeze(-1)), torch.zeros_like(s))
    da = dout.to(acc)
    dv = torch.matmul(p.transpose(-2, -1), da)
    dp = torch.matmul(da, v.to(acc).transpose(-2, -1))
    delta = (da * out.to(acc)).sum(-1, keepdim=True)
    ds = p * (dp - delta)
    dq = torch.matmul(ds, k.to(acc)) * scale
    dk = torch.matmul(ds.transpose(-2, -1), q.to(acc)) * scale
    return dq, dk, dv
