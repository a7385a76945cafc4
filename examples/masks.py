"""mask_mod functions for `kind: mask_mod` block-sparse policies.

A policy names one by import path, e.g.
``pattern: {kind: mask_mod, function: "examples.masks:sliding_window_with_sink"}``;
the policy loader imports it when the file is loaded, so the module must be
importable: ``examples.masks`` is, from the repository root (``python -c``,
``python -m ...``, pytest), because ``examples`` is a namespace package there.

A mask_mod is FlexAttention's ``mask_mod(b, h, q_idx, kv_idx) -> bool``: it is
called with 0-d integer tensors (vectorised with vmap), on global token
positions, and must use tensor ops only (no Python ``if`` on the values).
Causal masking is added by the backend when the attention is causal.
"""

from __future__ import annotations

import torch

WINDOW = 256  # tokens on each side a query sees
SINK = 16  # the first SINK tokens are seen by every query ("attention sinks")


def sliding_window_with_sink(
    b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor
) -> torch.Tensor:
    """True where query `q_idx` may attend to key `kv_idx`: the key is within
    WINDOW tokens of the query, or one of the first SINK tokens."""
    return ((q_idx - kv_idx).abs() <= WINDOW) | (kv_idx < SINK)
