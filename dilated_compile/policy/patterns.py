"""Checking a block-sparse ``pattern:`` mapping into a :class:`BlockPattern`.

One entry per pattern kind says which keys it takes; one entry per key says
how its value is checked. :func:`parse_pattern` is usable on its own (the
direct functions take a pattern mapping) and raises the same
:class:`PolicyError` messages as a policy file with that pattern would.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

from .errors import Where, child_key, one_of, show
from .specs import PATTERN_KINDS, BlockPattern
from .values import check_choice, check_int, check_keys, check_mapping, missing

__all__ = ["PATTERN_KEYS", "PATTERN_EXPECTED", "parse_pattern", "check_pattern"]

PATTERN_EXPECTED = "a mapping like {kind: local_window, window: 2}"
_FUNCTION_EXPECTED = "'package.module:name' naming an importable callable"

# The keys each pattern kind takes besides `kind`, in the order they are checked.
PATTERN_KEYS: dict[str, tuple[str, ...]] = {
    "local_window": ("window",),
    "dilated": ("stride", "window"),
    "global_local": ("global_blocks", "window"),
    "mask_mod": ("function",),
}
_ALL_PATTERN_KEYS = ("kind",) + tuple(sorted({k for keys in PATTERN_KEYS.values() for k in keys}))


def _import_callable(where: Where, spec: str, key: str) -> None:
    """Import ``package.module:name`` and check that it is callable."""
    module_name, _, attr_path = spec.partition(":")
    try:
        target: Any = importlib.import_module(module_name)
    except Exception as exc:  # importing runs arbitrary module code
        message = f"cannot import module {module_name!r}: {type(exc).__name__}: {exc}"
        raise where.error(key, message, _FUNCTION_EXPECTED) from None
    for attr in attr_path.split("."):
        try:
            target = getattr(target, attr)
        except Exception:
            raise where.error(key, f"module {module_name!r} has no attribute {attr_path!r}", _FUNCTION_EXPECTED) from None
    if not callable(target):
        raise where.error(key, f"{spec!r} is {show(target)}, not callable", _FUNCTION_EXPECTED)


def _check_function(where: Where, value: Any, key: str) -> str:
    """A 'package.module:name' string naming a callable (imported to check it)."""
    if not isinstance(value, str):
        raise where.error(key, f"got {show(value)}", _FUNCTION_EXPECTED)
    module_name, colon, attr_path = value.partition(":")
    parts = module_name.split(".") + attr_path.split(".")
    if not colon or not all(part.isidentifier() for part in parts):
        raise where.error(key, f"got {value!r}", _FUNCTION_EXPECTED)
    _import_callable(where, value, key)
    return value


# How the value of each pattern key is checked.
_FIELD_CHECKS: dict[str, Callable[[Where, Any, str], Any]] = {
    "window": lambda where, value, key: check_int(where, value, key, 0),
    "stride": lambda where, value, key: check_int(where, value, key, 1),
    "global_blocks": lambda where, value, key: check_int(where, value, key, 1),
    "function": _check_function,
}


def check_pattern(where: Where, value: Any, key: str) -> BlockPattern:
    """The pattern mapping at dotted key `key` of a document, checked."""
    m = check_mapping(where, value, key, PATTERN_EXPECTED)
    check_keys(where, m, key, _ALL_PATTERN_KEYS)
    if "kind" not in m:
        raise missing(where, f"{key}.kind", "", one_of(PATTERN_KINDS))
    kind = check_choice(where, m["kind"], f"{key}.kind", PATTERN_KINDS)
    needed = PATTERN_KEYS[kind]
    for name in m:
        if name != "kind" and name not in needed:
            owners = [k for k, keys in PATTERN_KEYS.items() if name in keys]
            raise where.error(
                f"{key}.{name}", f"applies only to kind: {', '.join(owners)}",
                f"keys for kind: {kind}: " + ", ".join(("kind",) + needed),
            )
    fields: dict[str, Any] = {}
    for name in needed:
        if name not in m:
            raise missing(where, f"{key}.{name}", f" (required for kind: {kind})", f"a value for {name}")
        fields[name] = _FIELD_CHECKS[name](where, m[name], child_key(key, name))
    return BlockPattern(kind=kind, **fields)


def parse_pattern(value: Any, *, key: str = "pattern", file: str | None = None) -> BlockPattern:
    """A :class:`BlockPattern` from a mapping such as ``{"kind": "local_window", "window": 2}``.

    Raises :class:`PolicyError` naming the dotted key (``pattern.window``,
    under `key`) and what was expected; `file` is named too when given.
    """
    return check_pattern(Where(file), value, key)
