"""Checks of single values in a policy document.

Each check takes the :class:`Where` of the document, the value and its
dotted key, and returns the value (converted where needed) or raises a
:class:`PolicyError` at that key saying what was expected.
"""

from __future__ import annotations

import numbers
from typing import Any, Mapping, Sequence

from .errors import PolicyError, Where, child_key, did_you_mean, one_of, show

__all__ = [
    "is_int",
    "check_int",
    "check_bool",
    "check_choice",
    "check_mapping",
    "check_positive_ints",
    "check_keys",
    "missing",
]


def is_int(value: Any) -> bool:
    """An integer that is not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_int(where: Where, value: Any, key: str, minimum: int) -> int:
    """An int >= `minimum`."""
    expected = f"an integer >= {minimum}"
    if not is_int(value):
        raise where.error(key, f"got {show(value)}", expected)
    if value < minimum:
        raise where.error(key, f"got {value}", expected)
    return int(value)


def check_bool(where: Where, value: Any, key: str) -> bool:
    """A bool."""
    if not isinstance(value, bool):
        raise where.error(key, f"got {show(value)}", "true or false")
    return value


def check_choice(where: Where, value: Any, key: str, choices: Sequence[str], hint: str = "") -> str:
    """A string among `choices`; `hint` is added when no choice is close."""
    if not isinstance(value, str):
        raise where.error(key, f"got {show(value)}", "a string, " + one_of(choices))
    if value not in choices:
        raise where.error(key, f"unknown value {value!r}{did_you_mean(value, choices) or hint}", one_of(choices))
    return value


def check_mapping(where: Where, value: Any, key: str, expected: str) -> Mapping[Any, Any]:
    """A mapping."""
    if not isinstance(value, Mapping):
        raise where.error(key, f"got {show(value)}", expected)
    return value


def check_positive_ints(where: Where, value: Any, key: str) -> tuple[int, ...]:
    """A non-empty list of ints >= 1."""
    expected = "a non-empty list of positive integers"
    if not isinstance(value, (list, tuple)):
        raise where.error(key, f"got {show(value)}", expected)
    if not value:
        raise where.error(key, "empty list", expected)
    return tuple(check_int(where, item, f"{key}[{i}]", 1) for i, item in enumerate(value))


def check_keys(where: Where, mapping: Mapping[Any, Any], key: str, allowed: Sequence[str]) -> None:
    """Every key of `mapping` is in `allowed` (else "unknown key", with a "did you mean")."""
    for name in mapping:
        if name not in allowed:
            hint = did_you_mean(name, allowed)
            raise where.error(child_key(key, name), f"unknown key{hint}", one_of(sorted(allowed)))


def missing(where: Where, key: str, why: str, expected: str) -> PolicyError:
    """PolicyError for a required key that is absent; `why` follows "missing"."""
    return where.error(key, f"missing{why}", expected)
