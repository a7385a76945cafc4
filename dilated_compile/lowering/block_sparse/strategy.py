"""Block-sparse attention, declared as a strategy (see `lowering.strategy`)."""

from __future__ import annotations

from dataclasses import asdict

from ...policy.specs import BlockSparseSpec
from ..strategy import Functions, Strategy
from .arguments import decode_parameters, encode_parameters


def _call_arguments(spec: BlockSparseSpec) -> dict:
    """block_size and pattern (a plain dict of the set fields) of a block-sparse rule."""
    pattern = {key: val for key, val in asdict(spec.pattern).items() if val is not None}
    return {"block_size": spec.block_size, "pattern": pattern}


def _site_arguments(spec: BlockSparseSpec) -> tuple[tuple, dict]:
    return (), _call_arguments(spec)


def _describe(spec: BlockSparseSpec, n) -> str:
    """e.g. ``block_sparse b=128 local_window(window=2), 5.9% of blocks``."""
    from .patterns import density  # builds block layouts with torch: only when called

    text = f"block_sparse {spec.describe()}"
    if spec.pattern.kind != "mask_mod" and isinstance(n, int) and n > 0:
        text += f", {100 * density(spec.pattern, spec.block_size, n):.3g}% of blocks"
    return text


def _load() -> Functions:
    from .functions import FUNCTIONS

    return FUNCTIONS


STRATEGY = Strategy(
    name="block_sparse",
    spec_type=BlockSparseSpec,
    parameters=("block_size", "pattern"),
    site_arguments=_site_arguments,
    ring_parameters=_call_arguments,
    describe=_describe,
    encode=encode_parameters,
    decode=decode_parameters,
    load=_load,
)
