"""Whether the graph being traced may launch the package's Triton kernels itself.

While the backend hands a rewritten graph to Inductor (`inlining`), a site
whose kernels are plain Triton launches with static shapes records those
launches into the graph (``torch.library.triton_op``): Inductor's generated
code then launches them with its own buffers, without a custom op's
dispatch around them, and inside CUDA graphs. Elsewhere (eager calls, the
``aot_eager`` and ``eager`` compilers, symbolic lengths) the sites run their
opaque custom ops. Opt-in, ``DILATED_INLINE=on``: it lowers the host time of
a compiled call but lengthens the compile (docs/performance.md).

Those launches read the sites' work items as constants of the graph, which
tracing copies before use (``lift_fresh_copy``); `ConstantsReadInPlace`, a
joint-graph pass the backend hands Inductor (after the user's own, if any),
passes such a constant to the kernels that only read it, so a call copies
nothing.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Iterator

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

SETTING = "DILATED_INLINE"
_ACTIVE: ContextVar[bool] = ContextVar("dilated_compile_inlining", default=False)


def setting() -> bool:
    """``DILATED_INLINE``: on, or off (the default)."""
    value = os.environ.get(SETTING, "off")
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


class ConstantsReadInPlace(CustomGraphPass):
    """Joint-graph pass: a graph constant whose copy (``lift_fresh_copy``) only user
    Triton kernels read is passed to them itself."""

    def __call__(self, graph: torch.fx.Graph) -> None:
        kernel = torch.ops.higher_order.triton_kernel_wrapper_functional
        for copy in graph.find_nodes(op="call_function", target=torch.ops.aten.lift_fresh_copy.default):
            constant = copy.args[0]
            if isinstance(constant, torch.fx.Node) and constant.op == "get_attr" and all(
                user.target is kernel and _reads_only(user, copy) for user in copy.users
            ):
                copy.replace_all_uses_with(constant)
                graph.erase_node(copy)

    def uuid(self) -> bytes:
        return get_hash_for_files((__file__,))


def _reads_only(launch: torch.fx.Node, tensor: torch.fx.Node) -> bool:
    """Whether the kernel `launch` (functional) leaves every argument it takes `tensor` as unwritten."""
    written = set(launch.kwargs["tensors_to_clone"])
    return not any(arg is tensor and name in written for name, arg in launch.kwargs["kwargs"].items())


class AfterUsersPass(CustomGraphPass):
    """The user's joint-graph passes (one, or a list), then `ConstantsReadInPlace`. Its uuid
    (what Inductor's FX graph cache keys on) is None where one of the user's passes has
    none, so that such a graph is not cached, as with the user's passes alone."""

    def __init__(self, users: Any):
        self.users = tuple(users) if isinstance(users, (list, tuple)) else (users,)

    def __call__(self, graph: torch.fx.Graph) -> None:
        for users in self.users:
            users(graph)
        ConstantsReadInPlace()(graph)

    def uuid(self) -> Any:
        ids = tuple(p.uuid() if isinstance(p, CustomGraphPass) else None for p in self.users)
        return None if any(i is None for i in ids) else (*ids, ConstantsReadInPlace().uuid())


def inductor_patches(patches: dict[str, Any]) -> dict[str, Any]:
    """The Inductor settings the inlined launches add to `patches` (the user's): the
    pass above, after the user's joint-graph pass where there is one (in `patches`
    or Inductor's config)."""
    import torch._inductor.config as inductor_config

    if not setting():
        return {}
    users = patches.get("joint_custom_post_pass", inductor_config.joint_custom_post_pass)
    return {"joint_custom_post_pass": AfterUsersPass(users) if users else ConstantsReadInPlace()}
