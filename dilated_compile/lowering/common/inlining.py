"""Whether the graph being traced may launch the package's Triton kernels itself.

While the backend hands a rewritten graph to Inductor (`inlining`), a site
whose kernels are plain Triton launches with static shapes records those
launches into the graph (``torch.library.triton_op``): Inductor's generated
code then launches them with its own buffers, without a custom op's
dispatch around them, and inside CUDA graphs. Elsewhere (eager calls, the
``aot_eager`` and ``eager`` compilers, symbolic lengths) the sites run their
opaque custom ops. ``DILATED_INLINE=off`` keeps the custom ops everywhere.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Iterator

SETTING = "DILATED_INLINE"
_ACTIVE: ContextVar[bool] = ContextVar("dilated_compile_inlining", default=False)


def setting() -> bool:
    """``DILATED_INLINE``: on (the default) or off."""
    value = os.environ.get(SETTING, "on")
    if value not in ("on", "off"):
        raise ValueError(f"{SETTING}={value!r}: expected on or off")
    return value == "on"


@contextmanager
def inlining() -> Iterator[None]:
    """Within this block, traced sites may record their kernel launches (see the module)."""
    token = _ACTIVE.set(setting())
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def inlining_on() -> bool:
    """Whether a site traced now may record its kernel launches into the graph."""
    return _ACTIVE.get() and os.environ.get("TRITON_INTERPRET") != "1"
