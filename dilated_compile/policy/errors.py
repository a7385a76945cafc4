"""The policy error and where it points: file, line, dotted key.

:class:`PolicyError` is the one exception type a wrong policy raises.
:class:`Where` knows the file a document came from and the line of each
dotted key in it, and makes errors located at a key. The helpers at the end
write the parts of messages: a short description of a value, a list of
choices and a "did you mean".
"""

from __future__ import annotations

import difflib
from typing import Any, Iterable, Mapping, Sequence

__all__ = ["PolicyError", "Where", "child_key", "parent_key", "show", "one_of", "did_you_mean"]


class PolicyError(ValueError):
    """A policy file or dict that is wrong.

    Attributes: ``file`` (the path as given, ``'<dict>'`` for a dict, or
    None), ``line`` (1-based, or None when unknown), ``key`` (the dotted key,
    e.g. ``'rules[0].segment_lengths'``, or None for the document as a whole),
    ``expected`` (what would have been right, or None) and ``message`` (what
    is wrong). ``str(e)`` reads like::

        policy.yaml:7: rules[0].segment_lenghts: unknown key; did you mean
        'segment_lengths'? expected one of: attention, block_size, ...
    """

    def __init__(
        self,
        message: str,
        file: str | None = None,
        line: int | None = None,
        key: str | None = None,
        expected: str | None = None,
    ) -> None:
        self.message = message
        self.file = file
        self.line = line
        self.key = key
        self.expected = expected
        super().__init__(self._format())

    def _format(self) -> str:
        """The one-line text of the error."""
        if self.file is not None:
            where = self.file if self.line is None else f"{self.file}:{self.line}"
        else:
            where = None if self.line is None else f"line {self.line}"
        text = self.message
        if self.expected:
            sep = " " if text.endswith(("?", ".")) else "; "
            text = f"{text}{sep}expected {self.expected}"
        if self.key:
            text = f"{self.key}: {text}"
        return f"{where}: {text}" if where else text

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.message, self.file, self.line, self.key, self.expected))


class Where:
    """Where values came from: the file (None when there is none) and the line of each dotted key."""

    def __init__(self, file: str | None, lines: dict[str, int] | None = None) -> None:
        self.file = file
        self.lines: dict[str, int] = lines if lines is not None else {}

    def line_of(self, key: str) -> int | None:
        """Line of `key`, or of its nearest ancestor that has one."""
        while True:
            if key in self.lines:
                return self.lines[key]
            if not key:
                return None
            key = parent_key(key)

    def error(self, key: str, message: str, expected: str | None = None) -> PolicyError:
        """A PolicyError located at dotted key `key` ('' for the document as a whole)."""
        return PolicyError(message, self.file, self.line_of(key), key or None, expected)


def parent_key(key: str) -> str:
    """The dotted key one level up ('' at the top)."""
    cut = key.rfind("[") if key.endswith("]") else key.rfind(".")
    return key[:cut] if cut > 0 else ""


def child_key(key: str, name: object) -> str:
    """Dotted key of mapping entry `name` under `key`."""
    return f"{key}.{name}" if key else str(name)


def show(value: Any) -> str:
    """Short description of a value for messages, e.g. ``a float (1.5)``."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"a boolean ({value})"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, (list, tuple)):
        return "a list"
    kind = type(value).__name__
    text = repr(value)
    if len(text) > 40:
        text = text[:37] + "..."
    article = "an" if kind[:1].lower() in "aeiou" else "a"
    return f"{article} {kind} ({text})"


def one_of(choices: Iterable[str]) -> str:
    """``one of: a, b, c``."""
    return "one of: " + ", ".join(choices)


def did_you_mean(word: Any, choices: Sequence[str]) -> str:
    """``; did you mean 'x'?`` when a choice is close to `word`, else ''."""
    close = difflib.get_close_matches(str(word), list(choices), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""
