"""Prove what an attention mask is, from its compile-time value.

A mask counts as the causal mask only when its value, broadcast to
(query, key), keeps exactly the keys at positions <= the query's; it counts as
"no mask" when it keeps every key. Masked entries of an additive mask (or the
fill value of `masked_fill` / `where`) must be -inf or at most half the
dtype's minimum (`torch.finfo(dtype).min`, what HF models use), so that their
softmax weight is exactly 0. Anything else is a reason to leave the site.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.fx as fx

from .fold import NotConstant, constant_value


class NotProvable(Exception):
    """The mask is not provably causal or empty; the message says what it is instead."""


def padding_hint(exc: Exception) -> str:
    """What a mask that is not constant probably is, from what it depends on: a padding
    mask (an input of the model) or a learned bias (a parameter)."""
    text = str(exc)
    if "graph input" not in text:
        return ""
    if "_parameters_" in text:
        return " (a bias computed from parameters, such as ALiBi slopes or T5's relative position bias?)"
    return " (a padding mask?)"


def is_masking_value(value: Any, dtype: torch.dtype | None = None) -> bool:
    """True for -inf, or a number at most half the minimum of a floating dtype."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            return False
        dtype = dtype or value.dtype
        value = value.item()
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    if value == -math.inf:
        return True
    dtypes = [dtype] if dtype is not None and dtype.is_floating_point else []
    dtypes = dtypes or [torch.float16, torch.bfloat16, torch.float32, torch.float64]
    return any(value <= torch.finfo(d).min / 2 for d in dtypes)


def keep_from_additive(mask: torch.Tensor) -> torch.Tensor:
    """Where an additive float mask keeps a score (0) and masks it (a masking value)."""
    keep = mask == 0
    masked = mask[~keep]
    very_negative = (masked == -math.inf) | (masked <= torch.finfo(mask.dtype).min / 2)
    if masked.numel() and not bool(very_negative.all()):
        raise NotProvable(
            "the additive mask has values other than 0 and -inf / the dtype's minimum "
            "(a bias such as ALiBi or relative positions?)"
        )
    return keep


def keep_from_mask(mask: Any) -> torch.Tensor:
    """Keep-pattern of an SDPA-style `attn_mask` value (bool: True keeps; float: additive)."""
    if not isinstance(mask, torch.Tensor):
        raise NotProvable(f"the mask is not a tensor ({type(mask).__name__})")
    if mask.dtype == torch.bool:
        return mask
    if mask.dtype.is_floating_point:
        return keep_from_additive(mask)
    raise NotProvable(f"the mask has dtype {mask.dtype}")


def classify(keep: torch.Tensor, query_len: int, key_len: int) -> bool:
    """True when `keep` is the causal mask, False when it keeps everything; else NotProvable."""
    if keep.dim() < 2 or keep.shape[-2] not in (1, query_len) or keep.shape[-1] not in (1, key_len):
        raise NotProvable(f"the mask's shape {tuple(keep.shape)} does not end in ({query_len}, {key_len})")
    if bool(keep.all()):
        return False
    causal = torch.ones(query_len, key_len, dtype=torch.bool, device=keep.device).tril()
    if query_len == key_len and bool((keep == causal).all()):
        return True
    if keep.dim() > 2 and not bool(keep.flatten(0, -3).eq(keep.flatten(0, -3)[:1]).all()):
        raise NotProvable("the mask differs between batch entries or heads (a padding mask?)")
    raise NotProvable("the mask is neither the causal mask nor empty (a padding, window or custom mask?)")


def prove(node: Any, gm: fx.GraphModule | None, query_len: int, key_len: int) -> bool:
    """Causal flag that an SDPA `attn_mask` argument stands for; NotProvable when it is neither
    the causal mask nor an empty one."""
    try:
        value = constant_value(node, gm)
    except NotConstant as exc:
        raise NotProvable(f"the mask is not a compile-time constant: {exc}{padding_hint(exc)}") from exc
    return classify(keep_from_mask(value), query_len, key_len)
