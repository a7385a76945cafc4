"""Compiled frames that Dynamo runs for several modules of one class.

When a module's own method is compiled as a frame (a model compiled per block,
FSDP2's hooks or a graph break splitting the model), Dynamo guards the frame's
`self` by its class and the classes of its submodules, not by identity: the code
compiled for `layers.0` runs for every layer of that class. The backend sees
only the first, so what the policy decides there is what every such layer gets.
This module finds those layers and raises when the policy would decide
differently for any of them, rather than silently give them layer 0's decision.
"""

from __future__ import annotations

import warnings

import torch.nn as nn

from .frames import Frame, clean_name, unwrap
from .policy.model import Policy


class SharedFrameError(ValueError):
    """The policy decides differently for modules that run the same compiled frame."""


def _relative(path: str, prefix: str) -> str | None:
    if path == prefix:
        return ""
    return path[len(prefix) + 1:] if path.startswith(prefix + ".") else None


def _signature(module: nn.Module) -> tuple:
    """What Dynamo's guards on a frame's `self` check besides identity: the classes of the
    module and its submodules, its tensors' shapes, dtypes and grad flags."""
    tensors = [*module.named_parameters(), *module.named_buffers()]
    return (
        tuple(type(unwrap(m)) for m in module.modules()),
        tuple((n, tuple(t.shape), t.dtype, t.requires_grad) for n, t in tensors),
    )


def _guards_by_class() -> bool:
    """Whether Dynamo guards a frame's module by class (inlined nn modules: the default,
    and the only behaviour from torch 2.13) rather than by identity."""
    import torch._dynamo.config as config

    with warnings.catch_warnings():  # deprecated (always on) in torch 2.13
        warnings.simplefilter("ignore")
        return bool(getattr(config, "inline_inbuilt_nn_modules", True))


def sharing_modules(frame: Frame) -> list[tuple[str, nn.Module]]:
    """(path, module) of the other modules of the model that may run `frame`'s compiled
    code: those like the frame's own module in class, submodule classes and parameter
    shapes (none when that module is the model itself, or unknown)."""
    owner, model = frame.owner, frame.model
    if owner is None or model is None or owner is model or not _guards_by_class():
        return []
    out, seen, mine = [], {id(owner)}, None
    for name, module in model.named_modules(remove_duplicate=False):
        module = unwrap(module)
        if type(module) is not type(owner) or id(module) in seen:
            continue
        mine = _signature(owner) if mine is None else mine
        if _signature(module) == mine:
            seen.add(id(module))
            out.append((clean_name(name), module))
    return out


def shared_paths(frame: Frame | None, policy: Policy, site_paths: list[str]) -> list[str]:
    """Paths of the modules in other same-class modules that run the compiled sites at
    `site_paths` (absolute paths). Raises SharedFrameError when the policy's rule for one
    of them differs from the rule for the site it shares code with."""
    if frame is None:
        return []
    prefix = frame.path_of(frame.owner)
    others = sharing_modules(frame)
    if prefix is None or not others:
        return []
    shared, conflicts = [], []
    for path in site_paths:
        rel = _relative(path, prefix)
        if rel is None:
            continue
        mine = policy.rule_for(path)
        try:
            site_type = type(unwrap(frame.owner.get_submodule(rel)))
        except AttributeError:
            continue
        for other_path, other in others:
            try:
                same = type(unwrap(other.get_submodule(rel))) is site_type
            except AttributeError:
                same = False
            if not same:
                continue
            target = f"{other_path}.{rel}" if other_path and rel else other_path or rel
            theirs = policy.rule_for(target)
            if theirs is not mine:
                conflicts.append((target, theirs))
            shared.append(target)
    if conflicts:
        raise SharedFrameError(_message(frame, policy, site_paths, prefix, conflicts))
    return shared


def mirrors(frame: Frame | None, path: str, shared: list[str]) -> list[str]:
    """Of `shared` (what `shared_paths` returned for `frame`), the paths of the modules
    that run the compiled site at `path` in the other same-class modules."""
    prefix = None if frame is None or not shared else frame.path_of(frame.owner)
    rel = None if prefix is None else _relative(path, prefix)
    if rel is None:
        return []
    targets = {f"{o}.{rel}" if o and rel else o or rel for o, _ in sharing_modules(frame)}
    return [t for t in shared if t in targets]


def _describe(rule) -> str:
    return "no rule (left as it is)" if rule is None else rule.describe()


def _message(frame, policy, site_paths, prefix, conflicts) -> str:
    cls = type(frame.owner).__name__
    mine = [f"  {p or '<root>'}: {_describe(policy.rule_for(p))}" for p in site_paths
            if _relative(p, prefix) is not None]
    theirs = [f"  {p or '<root>'}: {_describe(r)}" for p, r in conflicts[:8]]
    more = f"\n  ... and {len(conflicts) - 8} more" if len(conflicts) > 8 else ""
    return (
        f"backend='dilated': {prefix or '<root>'} ({cls}) is compiled as a frame of its own, and "
        f"Dynamo runs that compiled code for every {cls} in {type(frame.model).__name__} (it checks "
        "the class, not the instance), but the policy decides differently for them. Compiled for:\n"
        + "\n".join(mine) + "\nalso run by:\n" + "\n".join(theirs) + more
        + f"\nWrite rules that give every {cls} the same decision (e.g. match 'layers.*.<name>' "
        f"rather than one layer), or compile the model so that the {cls} modules are traced "
        "within one frame (torch.compile of the whole model, without graph breaks in them)."
    )


def warn_unresolved(frame: Frame | None) -> None:
    """Warn when a site's module could not be found in the model: its path is then
    relative to the compiled frame, and rules for absolute paths do not match it."""
    if frame is None or not frame.unresolved:
        return
    where = type(frame.model).__name__ if frame.model is not None else "any model on the call stack"
    warnings.warn(
        f"backend='dilated': cannot tell where the module(s) {', '.join(frame.unresolved)} of the "
        f"compiled frame {frame.code!r} sit in {where}; their attention is matched against paths "
        "relative to that frame, which rules written for the whole model may not match",
        stacklevel=3,
    )
