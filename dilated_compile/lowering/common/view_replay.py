"""Our custom ops' real implementations run with autograd's view replay off.

AOTAutograd runs a compiled training graph's forward with view replay on
(``torch._C._set_view_replay_enabled(True)``, for graph outputs that alias
inputs). Inside an opaque op that only makes every view op of its Python
slower: each view records a function that replays its whole chain of views,
so a view costs about 10x more and chains cost more with every link
(measured on the CPU: 1.4 us per `reshape` eagerly, 17 us and growing
inside a compiled forward). Our ops return fresh tensors, never views of
their inputs, so nothing needs their internal views replayed.
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence, TypeVar

import torch

F = TypeVar("F", bound=Callable)


def without_view_replay(fn: F) -> F:
    """`fn` run with view replay off (and the caller's setting restored after)."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        if not torch._C._is_view_replay_enabled():
            return fn(*args, **kwargs)
        torch._C._set_view_replay_enabled(False)
        try:
            return fn(*args, **kwargs)
        finally:
            torch._C._set_view_replay_enabled(True)

    return run  # type: ignore[return-value]


def opaque_op(name: str, *, tags: Sequence[torch.Tag] = ()) -> Callable[[F], torch.library.CustomOpDef]:
    """``torch.library.custom_op(name)`` for one of our ops (no mutated inputs), its
    implementation run `without_view_replay`: every op of the package is defined
    through this, so none can miss it."""

    def define(fn: F) -> torch.library.CustomOpDef:
        return torch.library.custom_op(name, mutates_args=(), tags=tuple(tags))(without_view_replay(fn))

    return define
