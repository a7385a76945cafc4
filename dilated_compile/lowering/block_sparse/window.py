"""Attention with a sliding-window mask, as block-sparse attention (docs/spec.md, "Sliding windows").

A site whose mask is a sliding window of W positions (key j allowed for query
i when |i - j| < W, and j <= i when causal) runs as block-sparse attention
with a token window: under ``attention: dense`` blocks of at least W - 1
positions in a local window of one block, so every allowed pair lies in a
query block's own or neighbouring key blocks and the work is proportional to
N x W, not N^2; under ``attention: block_sparse`` the rule's own pattern, the
token window on top (the intersection of the two masks).
"""

from __future__ import annotations

import dataclasses

from ...policy.specs import BlockPattern, BlockSparseSpec

# Smallest block of a dense rule's window: below it blocks of W - 1 positions would make
# many tiny gathers for a few keys each.
MIN_BLOCK = 32


def dense_window_spec(window: int) -> BlockSparseSpec:
    """The block-sparse parameters of dense attention with a sliding window of `window`."""
    block = max(window - 1, MIN_BLOCK)
    return BlockSparseSpec(block, BlockPattern(kind="local_window", window=1, token_window=window))


def windowed_spec(attention: str, spec: BlockSparseSpec | None, window: int) -> BlockSparseSpec:
    """The block-sparse parameters that compute `attention` (a policy's ``attention:``, with
    its parameters `spec`) on a site whose mask is a sliding window of `window`."""
    if attention == "dense":
        return dense_window_spec(window)
    if attention == "block_sparse":
        return BlockSparseSpec(spec.block_size, dataclasses.replace(spec.pattern, token_window=window))
    raise ValueError(f"attention {attention!r} does not run with a sliding-window mask")
