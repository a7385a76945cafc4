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


def _aot_tracing() -> bool:
    return torch.compiler.is_compiling() and not torch.compiler.is_dynamo_compiling()


def outside_tracing() -> contextlib.AbstractContextManager:
    """Context in which tensors are real, even while a graph is being traced."""
    return _disable_current_modes() if _aot_tracing() else contextlib.nullcontext()


def graph_constant(t: torch.Tensor) -> torch.Tensor:
    """`t` (real, made under `outside_tracing`) as a value usable in the traced graph."""
    if not _aot_tracing():
        return t
    with _disable_current_modes():
        values = t.cpu().numpy()
    return torch.tensor(values, device=t.device)
