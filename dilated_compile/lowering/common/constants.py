"""Tensors computed while a graph is traced that become constants of the graph.

Lowerings compute index layouts and masks from shapes alone. Under
AOTAutograd tracing the inputs are fake tensors; a layout computed from
shapes is still real data, so it is computed outside the tracing modes and
enters the graph as a constant (``torch.tensor`` of its values is recorded as
a constant by make_fx). Under Dynamo tracing (a user calling a lowering
directly inside ``torch.compile``) both are no-ops and the computation is
traced like any other code.
"""

from __future__ import annotations

import contextlib

import torch
from torch.utils._python_dispatch import _disable_current_modes


def aot_tracing() -> bool:
    """Whether a graph is being traced below Dynamo (AOTAutograd / make_fx):
    tensors are fake, and anything computed from them lands in the graph.

    ``torch.compiler.is_compiling()`` says so on torch 2.13 but not on 2.11,
    so an active fake mode counts too.
    """
    if torch.compiler.is_dynamo_compiling():
        return False
    return torch.compiler.is_compiling() or torch._guards.detect_fake_mode() is not None


def outside_tracing() -> contextlib.AbstractContextManager:
    """Context in which tensors are real, even while a graph is being traced."""
    return _disable_current_modes() if aot_tracing() else contextlib.nullcontext()


def graph_constant(t: torch.Tensor) -> torch.Tensor:
    """`t` (real, made under `outside_tracing`) as a value usable in the traced graph."""
    if not aot_tracing():
        return t
    with _disable_current_modes():
        values = t.cpu().tolist()  # not numpy: it is not a dependency (torch runs without it)
    return torch.tensor(values, dtype=t.dtype, device=t.device).reshape(t.shape)
