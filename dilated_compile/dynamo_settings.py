"""Dynamo settings that let Hugging Face models under gradient checkpointing compile whole.

transformers 5 checkpoints a layer in `GradientCheckpointingLayer`
(`transformers/modeling_layers.py`). Two things in that path stop Dynamo
from tracing the `torch.utils.checkpoint` call, so the call graph-breaks
and runs eagerly (checkpoint is never traced outside a Dynamo graph): the
layer's attention then runs outside every compiled graph, as plain dense
attention, whatever the policy asked for.

1. The layer calls ``logger.warning_once("Caching is incompatible with
   gradient checkpointing in <Layer>. Setting `cache=None`.")`` when it
   drops a cache argument. Dynamo cannot trace a ``logging.Logger`` method:
   it either breaks the graph there or, for a method listed in
   ``torch._dynamo.config.ignore_logger_methods`` (an alias of
   ``ignore_logging_functions``; both exist in torch 2.11 to 2.13), skips
   the call. ``reorderable_logging_functions`` (run the call after the
   graph) applies to plain functions such as ``print`` only, never to a
   Logger method, so skipping is the only choice that avoids the break.
   This module adds the ``warning_once`` method of the one logger
   ``transformers.modeling_layers`` to that set: that message is not shown
   from compiled code (it still is where the layer runs eagerly). Every other
   logger, and every other method of this one, is left as it was.

2. With the ``kernels`` package installed, transformers wraps attention
   modules (``kernels.use_kernelized_func``) in a forward that sets and then
   resets a module-level context variable. Inside a checkpointed region that
   is a side effect, and Dynamo graph-breaks on side effects inside a
   checkpoint unless ``torch._dynamo.config.
   skip_fwd_side_effects_in_bwd_under_checkpoint`` is True (torch 2.11 to
   2.13). This module sets it to True when both ``transformers.modeling_layers``
   and ``kernels`` are loaded. Its meaning: Python side effects inside a
   compiled checkpointed region happen once, in the forward, and are not
   replayed when the backward recomputes the region (eager checkpointing
   replays them). The wrapper's set-then-reset has no net effect, so
   replaying it changes nothing.

Both are process-wide Dynamo settings (Dynamo has no per-backend settings
for tracing: the backend runs after the trace). Each is applied once, as
soon as the modules it is for are loaded: when this package is imported
(``torch.compile(backend="dilated")`` imports it) if they are loaded then,
else right after Python imports them (a finder on ``sys.meta_path`` that
watches only those module names and removes itself once both settings are
applied), so the order of imports does not matter and ``torch._dynamo.reset()``
does not undo them. A user who wants Dynamo's defaults back restores the two
settings after that.
"""

from __future__ import annotations

import importlib.abc
import logging
import sys
from importlib.machinery import ModuleSpec
from typing import Any

import torch

log = logging.getLogger("dilated_compile")

HF_CHECKPOINT_LOGGER = "transformers.modeling_layers"
"""The logger whose `warning_once` Dynamo skips (HF's checkpointing layer module)."""

_applied: set[str] = set()


def _ignore_checkpoint_warning() -> bool:
    """Add HF's checkpointing-layer `warning_once` to Dynamo's ignored logger methods, once
    transformers has imported that module (it defines `Logger.warning_once`)."""
    if HF_CHECKPOINT_LOGGER not in sys.modules or not hasattr(logging.Logger, "warning_once"):
        return False
    method = logging.getLogger(HF_CHECKPOINT_LOGGER).warning_once
    config = torch._dynamo.config
    before = set(config.ignore_logger_methods)
    if method not in before:
        config.ignore_logger_methods = before | {method}
        if not _config_logs_cleanly():
            config.ignore_logger_methods = before
            log.info(
                "Dynamo of torch %s cannot record a logger method among its ignored ones in its "
                "compilation metrics; HF's checkpointing warning_once is left to break the graph",
                torch.__version__,
            )
    return True


def _config_logs_cleanly() -> bool:
    """Whether Dynamo can still write its settings into its compilation metrics. torch 2.11
    serialises the alias ``ignore_logging_functions`` as JSON, which a method cannot be: every
    compile would then log an error."""
    dump = getattr(torch._dynamo.utils, "_get_dynamo_config_for_logging", None)
    if dump is None:
        return True
    try:
        dump()
    except TypeError:
        return False
    return True


def _allow_checkpoint_side_effects() -> bool:
    """Let Dynamo trace checkpointed HF layers that `kernels` wraps (see the module docstring)."""
    if HF_CHECKPOINT_LOGGER not in sys.modules or "kernels" not in sys.modules:
        return False
    torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = True
    return True


_SETTINGS = {
    "ignore_checkpoint_warning": _ignore_checkpoint_warning,
    "allow_checkpoint_side_effects": _allow_checkpoint_side_effects,
}


def apply_pending() -> None:
    """Apply each setting whose modules are loaded and that was not applied yet."""
    for name, apply in _SETTINGS.items():
        if name not in _applied and apply():
            _applied.add(name)


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs `apply_pending` right after one of `WATCHED` is imported; finds nothing itself."""

    def find_spec(self, name: str, path: Any, target: Any = None) -> ModuleSpec | None:
        if name not in WATCHED:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        exec_module = loader.exec_module

        def exec_then_apply(module: Any) -> None:
            exec_module(module)
            apply_pending()
            if len(_applied) == len(_SETTINGS) and self in sys.meta_path:
                sys.meta_path.remove(self)

        loader.exec_module = exec_then_apply  # this spec's own loader object only
        return spec


WATCHED = frozenset({HF_CHECKPOINT_LOGGER, "kernels"})
"""Modules whose import may make a setting applicable."""


def install() -> None:
    """Apply what can be applied now, and the rest right after the modules it needs load."""
    apply_pending()
    if len(_applied) < len(_SETTINGS) and not any(isinstance(f, _AfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport())
