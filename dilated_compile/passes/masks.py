"""Prove what an attention mask is, from its compile-time value.

A mask counts as the causal mask only when its value, broadcast to
(query, key), keeps exactly the keys at positions <= the query's; it counts as
"no mask" when it keeps every key; it is a sliding window of W positions when
it keeps exactly the keys j with i - W < j <= i (causal) or |i - j| < W
(bidirectional), the same for every batch entry and head. Masked entries of an additive mask (or the
fill value of `masked_fill` / `where`) must be -inf or at most half the
dtype's minimum (`torch.finfo(dtype).min`, what HF models use), so that their
softmax weight is exactly 0. Anything else is a reason to leave the site.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from .fold import NotConstant, constant_value


class NotProvable(Exception):
    """The mask is not provably causal, a sliding window or empty; the message says what it
    is instead."""


@dataclass(frozen=True)
class MaskForm:
    """What a mask provably is: the causal flag it stands for, and the sliding window (None:
    none) it keeps on top of it."""

    causal: bool
    window: int | None = None

    def suffix(self) -> str:
        """The site form's suffix, e.g. ``+causal-mask``, ``+sliding-window(W=4096)``."""
        if self.window is not None:
            return f"+sliding-window(W={self.window})" if self.causal else f"+local-window(W={self.window})"
        return "+causal-mask" if self.causal else "+empty-mask"


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


def _window(keep: torch.Tensor, causal: bool) -> int | None:
    """W when the (n, n) `keep` is a sliding window of W < n positions (causal: i - W < j <= i;
    else |i - j| < W), else None."""
    n = keep.shape[-1]
    width = int(keep[-1].sum()) if causal else int(keep[0].sum())  # the last / first row's keys
    if not 1 <= width < n:
        return None
    pos = torch.arange(n, device=keep.device)
    distance = pos[:, None] - pos[None, :]
    expected = (distance >= 0) & (distance < width) if causal else distance.abs() < width
    return width if bool((keep == expected).all()) else None


def classify(keep: torch.Tensor, query_len: int, key_len: int) -> MaskForm:
    """What `keep` (True: the key is kept) is: the causal mask, a sliding window (causal or
    bidirectional) or no mask; NotProvable otherwise. A window as wide as the sequence is the
    causal mask or no mask."""
    if keep.dim() < 2 or keep.shape[-2] not in (1, query_len) or keep.shape[-1] not in (1, key_len):
        raise NotProvable(f"the mask's shape {tuple(keep.shape)} does not end in ({query_len}, {key_len})")
    if bool(keep.all()):
        return MaskForm(False)
    if keep.dim() > 2 and not bool(keep.flatten(0, -3).eq(keep.flatten(0, -3)[:1]).all()):
        raise NotProvable("the mask differs between batch entries or heads (a padding mask?)")
    if query_len == key_len:
        square = keep.flatten(0, -3)[0] if keep.dim() > 2 else keep
        square = square.expand(query_len, key_len)
        causal = torch.ones(query_len, key_len, dtype=torch.bool, device=keep.device).tril()
        if bool((square == causal).all()):
            return MaskForm(True)
        for is_causal in (True, False):
            window = _window(square, is_causal)
            if window is not None:
                return MaskForm(is_causal, window)
    raise NotProvable(
        "the mask is neither the causal mask, a sliding window nor empty (a padding or custom mask?)"
    )


def prove(node: Any, gm: fx.GraphModule | None, query_len: int, key_len: int) -> MaskForm:
    """What an SDPA `attn_mask` argument stands for (causal flag and sliding window);
    NotProvable when it is neither the causal mask, a sliding window nor an empty one."""
    try:
        value = constant_value(node, gm)
    except NotConstant as exc:
        raise NotProvable(f"the mask is not a compile-time constant: {exc}{padding_hint(exc)}") from exc
    return classify(keep_from_mask(value), query_len, key_len)
