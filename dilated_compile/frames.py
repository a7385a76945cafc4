"""Where a compiled frame sits in the model the user called: absolute module paths.

Dynamo compiles Python frames, not models. A frame's graph names the modules it
uses relative to the frame (`L['self'].attn`, `L['___stack0'].attn` in a resume
function), and a model compiled per block, split by graph breaks or by FSDP2's
hooks is several frames. While the backend runs, Dynamo's current translator
holds the frame's real locals, so each such name resolves to the module object;
the module's name in the outermost model (`named_modules()`) is its absolute path.

The outermost model: of the modules whose calls are in progress (on the Python
stack around the backend call), the outermost that holds the frame's own module
(`self`); a `torch.compile` wrapper (`OptimizedModule`) stands for the module it
wraps. Without such a call (a compiled function that takes the model as an
argument), the frame's own module, or the first module among its arguments. Wrapper components (`_orig_mod`,
FSDP1 and checkpoint wrappers) are left out of names.
"""

from __future__ import annotations

import re
import sys
import traceback
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch.nn as nn

WRAPPER_PARTS = frozenset({"_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module"})


def clean_name(name: str) -> str:
    """`name` without wrapper components, e.g. ``layers.0._orig_mod.attn`` -> ``layers.0.attn``."""
    return ".".join(p for p in name.split(".") if p and p not in WRAPPER_PARTS)


def unwrap(module: Any) -> Any:
    """The module a `torch.compile` wrapper (`OptimizedModule`) wraps; others unchanged."""
    while isinstance(getattr(module, "_orig_mod", None), nn.Module):
        module = module._orig_mod
    return module


def module_names(model: nn.Module) -> dict[int, str]:
    """id(module) -> its first name in `model` (wrappers left out), "" for `model` itself."""
    names: dict[int, str] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        names.setdefault(id(module), clean_name(name))
    return names


@dataclass
class GraphBreak:
    """Why Dynamo ended a compiled graph early, and where in the user's code."""

    reason: str  # first line of Dynamo's reason
    frames: tuple[tuple[str, int, str], ...]  # (file, line, function), outermost first

    @classmethod
    def from_reason(cls, reason: Any) -> "GraphBreak | None":
        """From Dynamo's `GraphCompileReason`; None when the graph ended normally."""
        if reason is None or not getattr(reason, "graph_break", False):
            return None
        text = str(getattr(reason, "reason", "")).strip().splitlines()
        stack = getattr(reason, "user_stack", None) or []
        frames = tuple(
            (f.filename, f.lineno or 0, f.name) for f in stack if isinstance(f, traceback.FrameSummary)
        )
        return cls(text[0] if text else "graph break", frames)

    def describe(self) -> str:
        where = f" at {self.frames[-1][0]}:{self.frames[-1][1]} in {self.frames[-1][2]}" if self.frames else ""
        return f"{self.reason}{where}"


@dataclass
class Frame:
    """The frame Dynamo is compiling, and the model it belongs to."""

    model: nn.Module | None  # outermost model: site paths are names in it; None when not found
    hook_target: nn.Module | None  # a module called eagerly around the frame (its next call runs checks)
    owner: nn.Module | None  # the module whose method the frame runs (`self`), when known
    f_locals: dict[str, Any]
    f_globals: dict[str, Any]
    code: str  # the frame's function name
    graph_break: GraphBreak | None = None  # why this graph ended early, if it did
    names: dict[int, str] = field(default_factory=dict)
    unresolved: list[str] = field(default_factory=list)  # module names that got no absolute path

    def resolve(self, source: str) -> Any:
        """The object a Dynamo source name (``L['self'].layers[0]``) stands for, or None."""
        root = _ROOT.match(source)
        if root is None:
            return None
        scope = self.f_locals if root[1] == "L" else self.f_globals
        if root[2] not in scope:
            return None
        obj, pos = scope[root[2]], root.end()
        while pos < len(source):
            step = _STEP.match(source, pos)
            if step is None:
                return None
            try:
                if step[1] is not None:
                    obj = getattr(obj, step[1])
                elif step[2] is not None:
                    obj = obj[step[2]]
                else:
                    obj = obj[int(step[3])]
            except Exception:  # noqa: BLE001 - any failure means: not resolvable
                return None
            pos = step.end()
        return obj

    def absolute_path(self, source: str) -> str | None:
        """Absolute dotted path of the module named `source` in this frame, or None. Without
        a model (a compiled function given no module), paths are names in the module
        `source` starts from (``G['net']``: the global `net`)."""
        obj = unwrap(self.resolve(source))
        names = self.names
        if self.model is None:
            root = _ROOT.match(source)
            base = unwrap(self.resolve(root[0])) if root else None
            names = module_names(base) if isinstance(base, nn.Module) else {}
        if isinstance(obj, nn.Module) and id(obj) in names:
            return names[id(obj)]
        if source not in self.unresolved:
            self.unresolved.append(source)
        return None

    def path_of(self, module: nn.Module | None) -> str | None:
        return None if module is None else self.names.get(id(module))


_ROOT = re.compile(r"([LG])\['([^']*)'\]")
_STEP = re.compile(r"\.([A-Za-z_0-9]\w*)|\['([^']*)'\]|\[(\d+)\]")

_ACTIVE: ContextVar[Frame | None] = ContextVar("dilated_compile_frame", default=None)


def _current_tx() -> Any:
    """Dynamo's translator of the frame being compiled, None outside a compile."""
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        return InstructionTranslator.current_tx()
    except Exception:  # noqa: BLE001 - no translator (not under Dynamo, or another torch)
        return None


def _modules_on_stack() -> list[nn.Module]:
    """Modules whose calls are in progress, innermost first (one entry per module)."""
    found: list[nn.Module] = []
    frame = sys._getframe(1)
    while frame is not None:
        obj = frame.f_locals.get("self") if frame.f_code.co_name in _CALL_FRAMES else None
        if isinstance(obj, nn.Module) and all(obj is not m for m in found):
            found.append(obj)
        frame = frame.f_back
    return found


_CALL_FRAMES = frozenset({"_call_impl", "_wrapped_call_impl", "__call__"})


def _choose_model(stack: list[nn.Module], owner: nn.Module | None) -> tuple[nn.Module | None, nn.Module | None]:
    """(model, hook target) for a frame of `owner` called within the modules of `stack`
    (innermost first): the outermost module that holds `owner`, and the module to hook
    for its calls (the `torch.compile` wrapper of it when one is being called)."""
    model = hook = None
    for module in stack:
        inner = unwrap(module)
        if owner is not None and inner is not owner and all(m is not owner for m in inner.modules()):
            continue
        if inner is not model:
            model, hook = inner, module
        elif inner is not module:  # the compile wrapper of the model found: hook that
            hook = module
    if model is None and owner is not None:
        model = owner
    return model, hook


def current_frame() -> Frame | None:
    """The frame being compiled, when the backend runs under Dynamo; else None."""
    tx = _current_tx()
    if tx is None:
        return None
    f_locals = getattr(tx, "f_locals", None) or {}
    owner = unwrap(f_locals.get("self"))
    owner = owner if isinstance(owner, nn.Module) else None
    model, hook = _choose_model(_modules_on_stack(), owner)
    if model is None:  # a compiled function: the first module among its locals
        model = next((unwrap(v) for v in f_locals.values() if isinstance(unwrap(v), nn.Module)), None)
    code = getattr(getattr(tx, "f_code", None), "co_name", "?")
    reason = getattr(getattr(tx, "output", None), "compile_subgraph_reason", None)
    return Frame(
        model=model,
        hook_target=hook,
        owner=owner,
        f_locals=f_locals,
        f_globals=getattr(tx, "f_globals", None) or {},
        code=code,
        graph_break=GraphBreak.from_reason(reason),
        names=module_names(model) if model is not None else {},
    )


@contextmanager
def resolving(frame: Frame | None) -> Iterator[Frame | None]:
    """Within: site paths found are absolute paths in `frame`'s model (see `absolute_path`)."""
    token = _ACTIVE.set(frame)
    try:
        yield frame
    finally:
        _ACTIVE.reset(token)


def absolute_path(source: str) -> str | None:
    """Absolute path of the module a Dynamo source names, in the frame being compiled;
    None outside `resolving`, or when the module is not found in the model."""
    frame = _ACTIVE.get()
    return None if frame is None else frame.absolute_path(source)


def module_object(source: str | None) -> Any:
    """The module a Dynamo source name (``L['self'].layers[0].attn``) stands for in the frame
    being compiled (None: the frame's own module), wrappers unwrapped; None outside
    `resolving` or when it cannot be resolved."""
    frame = _ACTIVE.get()
    if frame is None:
        return None
    obj = frame.owner if source is None else unwrap(frame.resolve(source))
    return obj if isinstance(obj, nn.Module) else None


def owner_path() -> str | None:
    """Absolute path of the module whose method the frame being compiled runs (its
    `self`), where attention written directly in that method lives; None outside
    `resolving`, for a frame of no module, or when it is not found in the model."""
    frame = _ACTIVE.get()
    return None if frame is None else frame.path_of(frame.owner)
