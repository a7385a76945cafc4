"""Block-sparse attention's parameters as one custom-op argument, and back."""

from __future__ import annotations

import json
from dataclasses import asdict
from functools import lru_cache
from typing import Any

from ...policy.specs import BlockPattern, BlockSparseSpec
from ..strategy import canonical


def encode_parameters(block_size: int | None = None, pattern: Any = None, **_: object) -> str:
    """The parameters as one custom-op argument: canonical JSON of the block size and the
    pattern's fields (validated; a mask_mod's function as its import path)."""
    from .patterns import as_pattern  # imports the policy loader: only when called

    if block_size is None or pattern is None:
        raise ValueError('ring attention with inner="block_sparse" needs block_size and pattern')
    return canonical({"block_size": int(block_size), "pattern": asdict(as_pattern(pattern, block_size))})


@lru_cache(maxsize=256)
def decode_parameters(text: str) -> BlockSparseSpec:
    """The parameters `encode_parameters` wrote as `text`."""
    d = json.loads(text)
    return BlockSparseSpec(int(d["block_size"]), BlockPattern(**d["pattern"]))
