"""The functions a rewritten graph calls: each strategy's (static and dynamic), and the
ring's, which runs a strategy as its inner attention."""

from __future__ import annotations

from typing import Callable


def ring_functions() -> tuple[Callable, Callable]:
    """(`ring_attention_local`, `dynamic_ring_attention`): what a ring site becomes with
    static and with symbolic lengths."""
    from .ring.attention import ring_attention_local
    from .ring.op import dynamic_ring_attention

    return ring_attention_local, dynamic_ring_attention


def lowered_functions() -> tuple[Callable, ...]:
    """Every Python function a rewritten graph may call."""
    from .registry import STRATEGIES

    functions = [s.functions for s in STRATEGIES.values()]
    ring_local, ring_dynamic = ring_functions()
    return (
        *(f.static for f in functions if f.static is not None),
        ring_local,
        *(f.dynamic for f in functions if f.dynamic is not None),
        ring_dynamic,
    )
