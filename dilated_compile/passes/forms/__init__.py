"""One site finder per way attention is written (SPEC section 2).

Each finder takes a GraphModule and returns the `Site`s of its form, with q/k/v
in (batch, heads, seq, head_dim) layout, the causal flag and scale it proved,
and a `problem` when the site cannot be rewritten exactly.
"""

from __future__ import annotations

from . import hand_written, mha, sdpa

FINDERS = (sdpa.find, hand_written.find, mha.find, mha.find_fast_paths)

__all__ = ["FINDERS"]
