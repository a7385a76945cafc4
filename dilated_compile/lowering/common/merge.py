"""Merge partial attention results by log-sum-exp."""

from __future__ import annotations

import math

import torch


def merge_by_lse(outs: list[torch.Tensor], lses: list[torch.Tensor]):
    """One softmax over the union of the patterns' keys: (out, lse) from partials.

    Pointwise over the list (no stack), so it fuses into one kernel. Where no
    pattern selects a position (all lse = -inf) the output is 0, lse -inf.
    """
    top = lses[0]
    for l in lses[1:]:
        top = torch.maximum(top, l)
    safe_top = torch.where(torch.isinf(top), torch.zeros_like(top), top)
    weights = [torch.exp(l - safe_top) for l in lses]
    total = weights[0]
    for wgt in weights[1:]:
        total = total + wgt
    safe_total = torch.where(total > 0, total, torch.ones_like(total))
    out = weights[0].unsqueeze(-1) * outs[0]
    for wgt, o in zip(weights[1:], outs[1:]):
        out = out + wgt.unsqueeze(-1) * o
    out = out / safe_total.unsqueeze(-1)
    lse = torch.where(total > 0, safe_top + torch.log(safe_total), torch.full_like(top, -math.inf))
    return out, lse
