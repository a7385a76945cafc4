"""What the policy targeted in a compiled model but did not get, told once per model.

The backend sees one Dynamo frame at a time. What the policy targeted but no
compiled graph held is knowable only when every frame of a call of the model has
been compiled: after the first call of the outermost model (see `frames`) that
compiled something. Python gives no notice when a call that is already running
returns, so the check runs at the first of:

- the start of the model's next call (a forward pre-hook on the module called
  eagerly around the compiled frames: the `torch.compile` wrapper, or the
  outermost module of a model compiled per block; it removes itself);
- `explain()` returning, or `check_targets(model)` called by the user;
- the model being freed, or the interpreter exiting (then only what needs no
  model: rules that matched no site).

It warns (`warnings.warn`, shown by default), once per model:

- for each rule that matched no attention site in any graph of the model;
- for each module a rule targets that is expected to hold attention (of the class
  of a module that owns an attention site in a compiled graph of this model, or an
  `nn.MultiheadAttention`) but in which no attention site was compiled: it ran
  outside compiled code (a graph break in or around it, a part of the model not
  compiled) or was not found. The graph breaks Dynamo recorded in or around the
  module are named. (A rule that matches no site at all is the warning above.)

Under ``strict: true`` these are one `RewriteError` instead, raised from the
model's next call, `explain()` or `check_targets()` (logged as an error when
found only at exit); so is a targeted module without compiled attention under a
ring over several ranks, whatever `strict` says (it attended within one shard). Rules ``attention: dense`` without a ring are left out:
attention outside compiled code is dense attention.

What is kept per model is bounded: rule indices, module paths of compiled sites,
the last few graph breaks; keyed weakly by the model.
"""

from __future__ import annotations

import logging
import warnings
import weakref
from collections import deque
from dataclasses import dataclass, field
from typing import Iterable

import torch.nn as nn

from .frames import Frame, GraphBreak, clean_name, unwrap
from .policy.model import Policy, Rule

log = logging.getLogger("dilated_compile")

MAX_BREAKS = 32


class TargetWarning(UserWarning):
    """A policy rule, or a module it targets, got no rewritten attention."""


@dataclass
class ModelTargets:
    """What the backend learned about one model's compiled frames."""

    model: weakref.ref
    name: str  # the model's class name, for messages
    policies: dict[str, Policy] = field(default_factory=dict)  # digest -> policy
    used: dict[str, set[int]] = field(default_factory=dict)  # digest -> indices of rules with a site
    compiled: set[str] = field(default_factory=set)  # paths of modules owning a compiled site
    owner_classes: set[type] = field(default_factory=set)  # classes of those modules
    breaks: deque = field(default_factory=lambda: deque(maxlen=MAX_BREAKS))
    shard_local_told: set[str] = field(default_factory=set)  # modules warned about as shard-local
    checked: bool = False
    hook: object | None = None  # handle of the pre-hook that runs the check


_MODELS: "weakref.WeakKeyDictionary[nn.Module, ModelTargets]" = weakref.WeakKeyDictionary()


def _state_for(frame: Frame) -> ModelTargets | None:
    model = frame.model
    if model is None:
        return None
    state = _MODELS.get(model)
    if state is None:
        state = ModelTargets(weakref.ref(model), type(model).__name__)
        _MODELS[model] = state
        weakref.finalize(model, _check_at_end, state)
    if state.hook is None and not state.checked and frame.hook_target is not None:
        state.hook = frame.hook_target.register_forward_pre_hook(_pre_hook(state))
    return state


def _pre_hook(state: ModelTargets):
    def run(module, args):
        check(state)

    return run


def note_graph(frame: Frame | None, policy: Policy, sites: Iterable, shared: Iterable[str] = ()) -> None:
    """Record one compiled graph of `frame`'s model: its sites (objects with `module`,
    `rule` text), the paths of modules that run the same compiled code (`shared`), and
    the graph break that ended it."""
    state = _state_for(frame) if frame is not None else None
    if state is None:
        return
    state.policies.setdefault(policy.digest, policy)
    used = state.used.setdefault(policy.digest, set())
    model = state.model()
    by_path = _modules_by_path(model) if model is not None else {}
    for path in [s.module for s in sites] + list(shared):
        state.compiled.add(path)
        rule = policy.rule_for(path)
        if rule is not None:
            used.add(rule.index)
        if path in by_path:
            state.owner_classes.add(type(by_path[path]))
    if frame.graph_break is not None and frame.graph_break not in state.breaks:
        state.breaks.append(frame.graph_break)


def _modules_by_path(model: nn.Module) -> dict[str, nn.Module]:
    """Clean path (wrapper components left out) -> module, first name of each path."""
    out: dict[str, nn.Module] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        out.setdefault(clean_name(name), unwrap(module))
    return out


def _wants_attention(rule: Rule) -> bool:
    return rule.attention != "dense" or rule.ring is not None


def _under(path: str, prefix: str) -> bool:
    return prefix == "" or path == prefix or path.startswith(prefix + ".")


def _targeted_modules(model: nn.Module, policy: Policy, classes: set[type]) -> list[tuple[str, nn.Module, Rule]]:
    """(path, module, rule) for the modules a rule that wants attention targets and that
    are expected to hold attention: of a class in `classes` (owners of compiled sites)
    or an `nn.MultiheadAttention`; outermost first, one per subtree."""
    out = []
    for path, module in _modules_by_path(model).items():
        if not (type(module) in classes or isinstance(module, nn.MultiheadAttention)):
            continue
        rule = policy.rule_for(path)
        if rule is None or not _wants_attention(rule) or any(_under(path, p) for p, _, _ in out):
            continue
        out.append((path, module, rule))
    return out


def _breaks_near(state: ModelTargets, module: nn.Module, path: str, model: nn.Module) -> list[GraphBreak]:
    """Graph breaks whose user stack runs through the forward of `module`, a module in it,
    or else one of its ancestors."""

    def codes(modules) -> set:
        return {getattr(type(m).forward, "__code__", None) for m in modules}

    def hits(code_set) -> list[GraphBreak]:
        spans = [(c.co_filename, c.co_firstlineno, max((ln for *_, ln in c.co_lines() if ln), default=0))
                 for c in code_set if c is not None]
        return [b for b in state.breaks
                if any(f == fn and lo <= line <= hi for f, line, _ in b.frames for fn, lo, hi in spans)]

    inside = hits(codes(module.modules()))
    if inside:
        return inside
    parts, by_path = (path.split(".") if path else []), _modules_by_path(model)
    ancestors = [by_path[p] for p in (".".join(parts[:i]) for i in range(len(parts))) if p in by_path]
    return hits(codes(ancestors))


def _ring_over_ranks(rule: Rule) -> bool:
    """Whether `rule` asks for a ring over several ranks (attention left outside compiled
    code then attends within each rank's shard only)."""
    if rule.ring is None:
        return False
    try:
        from .sharding import spans_ranks

        return spans_ranks(rule.ring.group)
    except Exception:  # noqa: BLE001 - no process group: runs locally
        return False


def findings(state: ModelTargets) -> list[tuple[str, bool]]:
    """The messages of the check, each with whether it is an error whatever `strict` says
    (a ring over several ranks that did not get the attention); empty when everything
    targeted was compiled."""
    model = state.model()
    messages = []
    for digest, policy in state.policies.items():
        used = state.used.get(digest, set())
        breaks = "; ".join(b.describe() for b in state.breaks)
        for rule in policy.rules:
            if rule.index in used:
                continue
            text = (f"rules[{rule.index}] '{rule.match}' matches no attention site in the compiled "
                    f"model {state.name} (policy {policy.source}): module paths are names in "
                    f"{state.name}.named_modules()")
            if breaks and _wants_attention(rule):
                text += f". Dynamo broke the graph: {breaks}"
            messages.append((text, False))
        if model is None:
            continue
        for path, module, rule in _targeted_modules(model, policy, state.owner_classes):
            if any(_under(p, path) for p in state.compiled):
                continue
            text = (f"rules[{rule.index}] '{rule.match}' targets {path or '<root>'} in {state.name}, "
                    "but no attention in it was compiled: it ran outside compiled code (a graph "
                    "break in or around the module, or a part of the model that is not compiled) "
                    f"and is not {rule.attention} attention")
            near = _breaks_near(state, module, path, model)
            if near:
                text += ". Dynamo broke the graph: " + "; ".join(b.describe() for b in near)
            ring = _ring_over_ranks(rule)
            if ring:
                text += (": under the ring it attends within this rank's shard only. Remove the "
                         "graph break, or compile this module")
            messages.append((text, ring))
    return messages


def check(state: ModelTargets, *, at_exit: bool = False, stacklevel: int = 3) -> list[str]:
    """Run the check once: warn for each finding, or raise under a strict policy."""
    if state.checked:
        return []
    state.checked = True
    if state.hook is not None:
        state.hook.remove()
        state.hook = None
    found = findings(state)
    messages = [text for text, _ in found]
    strict = any(p.strict for p in state.policies.values())
    if messages and (strict or any(fatal for _, fatal in found)):
        text = ("the policy targets attention that was not rewritten:\n  " + "\n  ".join(messages)
                + "\nChange the rules or the model"
                + (", or set `strict: false` to be warned instead." if strict and not any(f for _, f in found) else "."))
        if at_exit:
            log.error("%s", text)
            return messages
        from .passes import RewriteError

        raise RewriteError(text)
    for text in messages:
        warnings.warn(text, TargetWarning, stacklevel=stacklevel)
    return messages


def _check_at_end(state: ModelTargets) -> None:
    try:
        check(state, at_exit=True)
    except Exception:  # noqa: BLE001 - nothing may escape a finalizer
        log.exception("dilated_compile: checking the compiled model's targets failed")


def check_targets(model: nn.Module, *, _stacklevel: int = 3) -> list[str]:
    """Check now what the policy targeted in `model` (compiled with backend='dilated',
    called at least once) but did not get; warn (or raise under ``strict: true``).
    Returns the messages. Runs once per model: later calls return []."""
    state = _MODELS.get(unwrap(model))
    return [] if state is None else check(state, stacklevel=_stacklevel)


def forget(model: nn.Module) -> None:
    """Drop what was recorded for `model` (its next compile starts afresh)."""
    state = _MODELS.pop(unwrap(model), None)
    if state is not None and state.hook is not None:
        state.hook.remove()


def note_frame(frame: Frame | None, policy: Policy, report) -> None:
    """After the passes ran on one frame's graph: raise when same-class modules that run
    this compiled code need other decisions, warn when a site's module was not found
    in the model, and record the graph for the once-per-model check."""
    from .shared_frames import shared_paths, warn_unresolved

    paths = [s.module for s in report.sites]
    shared = shared_paths(frame, policy, paths)
    report.also_runs_for = shared
    warn_unresolved(frame)
    note_graph(frame, policy, report.sites, shared)
    warn_shard_local(frame, report)
    warn_unstated_windows(report)


def warn_unstated_windows(report) -> None:
    """Warn for each ring site of `report` whose module declares a sliding window that no rule
    states (Python's warning filter shows each message once)."""
    if not report.unstated_windows:
        return
    from .passes.stated_window import WindowWarning

    for text in report.unstated_windows:
        warnings.warn(text, WindowWarning, stacklevel=3)


def warn_shard_local(frame: Frame | None, report) -> None:
    """Warn for each module of `report` whose attention attends within each rank's shard by
    accident, and for the modules that run the same compiled code: once per module per
    model (every compile, for a compiled function of no model)."""
    if not report.shard_local:
        return
    from .passes.shard_local import ShardLocalWarning
    from .shared_frames import mirrors

    state = _state_for(frame) if frame is not None else None
    told = state.shard_local_told if state is not None else set()
    for site in report.shard_local:
        for path in [site.module, *mirrors(frame, site.module, report.also_runs_for)]:
            if path not in told:
                told.add(path)
                warnings.warn(site.message(path), ShardLocalWarning, stacklevel=3)
