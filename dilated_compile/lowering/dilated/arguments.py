"""Dilated attention's parameters (docs/spec.md, "Dilated attention"): validation, and their text as one
custom-op argument."""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Sequence

import torch

from ...policy.specs import HEAD_SPLITS, DilatedSpec
from ..strategy import canonical


def check_dilated_args(
    segment_lengths: Sequence[int], dilation_rates: Sequence[int], head_split: str
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Validated (segment_lengths, dilation_rates) as tuples of ints."""
    seg, rates = tuple(segment_lengths), tuple(dilation_rates)
    if not seg or len(seg) != len(rates):
        raise ValueError(
            f"segment_lengths {list(seg)} and dilation_rates {list(rates)} must be non-empty "
            "lists of the same length"
        )
    for name, values in (("segment_lengths", seg), ("dilation_rates", rates)):
        if any(isinstance(x, bool) or int(x) != x or x < 1 for x in values):
            raise ValueError(f"{name} must be positive integers, got {list(values)}")
    if head_split not in HEAD_SPLITS:
        raise ValueError(f"head_split={head_split!r}: expected one of {', '.join(HEAD_SPLITS)}")
    return tuple(int(x) for x in seg), tuple(int(x) for x in rates)


@torch._dynamo.assume_constant_result  # Dynamo cannot trace json; the text is a constant
def encode_parameters(
    segment_lengths: Sequence[int] | None = None,
    dilation_rates: Sequence[int] | None = None,
    head_split: str = "groups",
    **_: object,
) -> str:
    """The parameters as one custom-op argument: canonical JSON, validated."""
    seg, rates = check_dilated_args(segment_lengths or (), dilation_rates or (), head_split)
    return canonical({"segment_lengths": list(seg), "dilation_rates": list(rates), "head_split": head_split})


@lru_cache(maxsize=256)
def decode_parameters(text: str) -> DilatedSpec:
    """The parameters `encode_parameters` wrote as `text`."""
    d = json.loads(text)
    return DilatedSpec(tuple(d["segment_lengths"]), tuple(d["dilation_rates"]), d["head_split"])
