"""Which module paths a rule's ``match`` names, and which rule a path gets.

A ``match`` starting with ``"re:"`` is a Python regular expression applied
with :func:`re.search` to the dotted module path (so it matches anywhere
unless anchored with ``^``/``$``). Any other ``match`` is a glob over dotted
paths that must match a whole path:

* ``*`` matches one or more characters within one component (no dots);
* ``**`` matches any run of characters including dots; as a whole component
  (``a.**.b``, ``**.attn``, ``encoder.**``) it matches zero or more
  components;
* ``?`` matches one non-dot character, ``[...]`` (``[!...]`` negated) one
  non-dot character of a class; every other character is literal;
* ``*`` and ``**`` on their own also match the root module, whose path is
  ``''`` (shown as ``<root>``): attention written in the top-level module's
  own ``forward`` belongs to it. A glob that needs a component
  (``**.attn``, ``*.*``, ``a.**``) does not match the root.

A glob matches a site when it matches the site's module path or any
ancestor of it (``encoder.layer.0`` matches ``encoder.layer.0.attention.self``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterable, Protocol, TypeVar

__all__ = ["PatternSyntaxError", "ModulePattern", "compile_match", "glob_to_regex", "path_and_ancestors", "first_match"]

REGEX_PREFIX = "re:"


class PatternSyntaxError(Exception):
    """A ``match`` value that cannot be compiled; the message says why."""


def _class_end(glob: str, start: int) -> int:
    """Index of the ']' closing the character class opened at `start`, or -1."""
    j = start + 1
    if j < len(glob) and glob[j] == "!":
        j += 1
    if j < len(glob) and glob[j] == "]":
        j += 1
    return glob.find("]", j)


def _class_regex(body: str) -> str:
    """Regex for the glob character class with contents `body` (one non-dot character)."""
    negate = body.startswith("!")
    if negate:
        body = body[1:]
    escaped = "".join("\\" + ch if ch in "\\^[]&~|" else ch for ch in body)
    return f"(?![.])[{'^' if negate else ''}{escaped}]"


def glob_to_regex(glob: str) -> str:
    """Regex (for :meth:`re.Pattern.fullmatch`) equivalent to a dotted-path glob."""
    if glob and glob.strip("*") == "":
        return ".*" if len(glob) > 1 else "[^.]*"  # only stars: the root '' too
    out: list[str] = []
    i, n = 0, len(glob)
    while i < n:
        if glob.startswith("**", i):
            j = i
            while j < n and glob[j] == "*":
                j += 1
            whole = (i == 0 or glob[i - 1] == ".") and (j == n or glob[j] == ".")
            if whole and i == 0 and j < n:
                out.append(r"(?:.*\.)?")  # leading '**.': zero or more components
                j += 1
            else:
                out.append(".*")
            i = j
        elif glob.startswith(".**", i) and (i + 3 == n or glob[i + 3] == "."):
            if i + 3 == n:
                out.append(r"(?:\..*)?")  # trailing '.**': zero or more components
                i = n
            else:
                out.append(r"\.(?:.*\.)?")  # inner '.**.': zero or more components
                i += 4
        elif glob[i] == "*":
            out.append(r"[^.]+")
            i += 1
        elif glob[i] == "?":
            out.append(r"[^.]")
            i += 1
        elif glob[i] == "[":
            end = _class_end(glob, i)
            if end < 0:
                raise PatternSyntaxError(f"'[' at position {i} has no closing ']'")
            out.append(_class_regex(glob[i + 1 : end]))
            i = end + 1
        else:
            out.append(re.escape(glob[i]))
            i += 1
    return "".join(out)


def path_and_ancestors(module_path: str) -> tuple[str, ...]:
    """The module path and every ancestor path, root ('') first."""
    parts = module_path.split(".") if module_path else []
    return tuple(".".join(parts[:i]) for i in range(len(parts) + 1))


@dataclass(frozen=True)
class ModulePattern:
    """A compiled ``match`` value."""

    text: str  # as written
    is_regex: bool
    regex: re.Pattern[str]

    def matches(self, module_path: str) -> bool:
        """Whether a site owned by the module at `module_path` is named by this pattern."""
        if self.is_regex:
            return self.regex.search(module_path) is not None
        return any(self.regex.fullmatch(p) is not None for p in path_and_ancestors(module_path))


@lru_cache(maxsize=512)
def compile_match(text: str) -> ModulePattern:
    """The compiled form of a rule's ``match``; raises PatternSyntaxError when it has none."""
    if text.startswith(REGEX_PREFIX):
        source, is_regex = text[len(REGEX_PREFIX):], True
        if not source:
            raise PatternSyntaxError("empty regular expression after 're:'")
    else:
        source, is_regex = glob_to_regex(text), False
    try:
        return ModulePattern(text, is_regex, re.compile(source))
    except (re.error, OverflowError, RecursionError, ValueError) as exc:
        what = "regular expression" if is_regex else "glob"
        raise PatternSyntaxError(f"bad {what}: {exc}") from None


class _Matcher(Protocol):
    def matches(self, module_path: str) -> bool: ...


MatcherT = TypeVar("MatcherT", bound=_Matcher)


def first_match(rules: Iterable[MatcherT], module_path: str) -> MatcherT | None:
    """The first of `rules` that matches `module_path`, or None."""
    for rule in rules:
        if rule.matches(module_path):
            return rule
    return None
