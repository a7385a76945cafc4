"""What torch's compiled-graph caches must key on besides the graph itself.

A rewritten graph calls this package's lowering functions (plain Python
functions, traced by AOTAutograd into aten ops). AOTAutograd's cache refuses
a graph that calls a Python function it does not know, unless the function's
dotted name is in ``torch._inductor.config.unsafe_marked_cacheable_functions``;
the value there is mixed into the cache key (of AOTAutograd's cache and, as
part of Inductor's config, of the FX graph cache). The value given here is a
hash of this package's source, the torch version, the policy's content and
the source of any user ``mask_mod`` the policy names, and the
environment settings that change the lowering (`LOWERING_ENV`): change any of them and
the caches miss; keep them and a second process hits.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import os
from functools import lru_cache
from pathlib import Path
from typing import Callable

import torch

from .policy.model import Policy

PACKAGE_DIR = Path(__file__).resolve().parent
LOWERING_ENV = ("DILATED_KERNEL", "DILATED_COMBINE")


@lru_cache(maxsize=1)
def package_source_hash() -> str:
    """sha256 of every .py file of this package (paths and contents) and the torch version."""
    h = hashlib.sha256(torch.__version__.encode())
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        h.update(str(path.relative_to(PACKAGE_DIR)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def _mask_mod_source(spec: str) -> str:
    """Source text of a ``package.module:name`` mask_mod (its repr if the source is unavailable)."""
    module_name, _, attr_path = spec.partition(":")
    target = importlib.import_module(module_name)
    for attr in attr_path.split("."):
        target = getattr(target, attr)
    try:
        return inspect.getsource(target)
    except (OSError, TypeError):
        return repr(target)


def policy_code_hash(policy: Policy) -> str:
    """sha256 of the package source, the policy content and its mask_mod functions' source."""
    h = hashlib.sha256(package_source_hash().encode())
    h.update(policy.digest.encode())
    for knob in LOWERING_ENV:  # they change what the lowering traces
        h.update(f"{knob}={os.environ.get(knob, '')}".encode())
    for rule in policy.rules:
        spec = getattr(rule, "block_sparse", None)
        pattern = getattr(spec, "pattern", None)
        if pattern is not None and pattern.kind == "mask_mod" and pattern.function:
            h.update(_mask_mod_source(pattern.function).encode())
    return h.hexdigest()


def _dotted(fn: Callable) -> str:
    return f"{fn.__module__}.{fn.__name__}"


def lowered_functions() -> tuple[Callable, ...]:
    """The Python functions a rewritten graph may call."""
    from .lowering.targets import lowered_functions as from_registry

    return from_registry()


def cacheable_functions_patch(policy: Policy) -> dict[str, str]:
    """The ``unsafe_marked_cacheable_functions`` Inductor setting for graphs compiled under `policy`:
    torch's own entries plus this package's lowering functions, keyed by `policy_code_hash`."""
    import torch._inductor.config as inductor_config

    marked = dict(getattr(inductor_config, "unsafe_marked_cacheable_functions", {}) or {})
    value = policy_code_hash(policy)
    for fn in lowered_functions():
        marked[_dotted(fn)] = value
    return marked
