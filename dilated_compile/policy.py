"""The policy file: which attention sites become what.

A policy is YAML (or a dict of the same shape, or an already loaded
:class:`Policy`), schema version 1::

    version: 1
    strict: false
    defaults:
      min_seq_len: 4096
    rules:
      - match: "transformer.h.*.attn"
        attention: dilated
        segment_lengths: [2048, 4096, 8192]
        dilation_rates: [1, 2, 4]
        head_split: longnet
        ring: {layout: zigzag}
      - match: "re:^encoder\\.layer\\.[0-3]\\."
        attention: block_sparse
        block_size: 128
        pattern: {kind: local_window, window: 2}

:func:`load_policy` turns it into frozen dataclasses. Anything wrong in it is
reported as a :class:`PolicyError` naming the file, the line, the dotted key
(``rules[0].segment_lengths``) and what was expected, with a "did you mean"
for misspelt keys and values. No other exception type escapes
:func:`load_policy`.

Choices this module makes where the specification is silent:

* An explicit ``null`` is a type error, except for ``defaults`` (no
  defaults) and ``ring.group`` (the world group). ``ring:`` with no value is
  therefore an error that points at ``ring: {}``.
* ``"re:"`` with nothing after it is an error (use ``"**"`` to match
  everything).
* YAML anchors, aliases and ``<<`` merge keys are allowed; a recursive alias
  is an error.
* :meth:`Policy.rule_for` looks at the module path only; ``min_seq_len`` is
  left to the caller, which knows the key length.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import importlib
import json
import numbers
import os
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

import yaml

__all__ = [
    "PolicyError",
    "DilatedSpec",
    "BlockPattern",
    "BlockSparseSpec",
    "RingSpec",
    "Rule",
    "Policy",
    "load_policy",
    "ATTENTION_KINDS",
    "HEAD_SPLITS",
    "PATTERN_KINDS",
    "RING_LAYOUTS",
]

SCHEMA_VERSION = 1
ATTENTION_KINDS = ("dense", "dilated", "block_sparse")
HEAD_SPLITS = ("groups", "longnet")
RING_LAYOUTS = ("contiguous", "zigzag")
PATTERN_KINDS = ("local_window", "dilated", "global_local", "mask_mod")

_TOP_KEYS = ("version", "strict", "defaults", "rules")
_COMMON_RULE_KEYS = ("match", "attention", "min_seq_len", "ring")
_KIND_KEYS: dict[str, tuple[str, ...]] = {
    "dense": _COMMON_RULE_KEYS,
    "dilated": _COMMON_RULE_KEYS + ("segment_lengths", "dilation_rates", "head_split"),
    "block_sparse": _COMMON_RULE_KEYS + ("block_size", "pattern"),
}
_RULE_KEYS = tuple(sorted({k for keys in _KIND_KEYS.values() for k in keys}))
_DEFAULT_KEYS = tuple(k for k in _RULE_KEYS if k != "match")
_PATTERN_KEYS: dict[str, tuple[str, ...]] = {
    "local_window": ("window",),
    "dilated": ("stride", "window"),
    "global_local": ("global_blocks", "window"),
    "mask_mod": ("function",),
}
_ALL_PATTERN_KEYS = ("kind", "function", "global_blocks", "stride", "window")
_RING_KEYS = ("group", "layout")

_DICT_SOURCE = "<dict>"
_MAX_NODES = 100_000
_MAX_DEPTH = 200


# --------------------------------------------------------------------------
# The error
# --------------------------------------------------------------------------


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


# --------------------------------------------------------------------------
# Matching module paths
# --------------------------------------------------------------------------


class _PatternSyntaxError(Exception):
    """A `match` pattern that cannot be compiled (internal)."""


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


def _glob_to_regex(glob: str) -> str:
    """Regex (for fullmatch) equivalent to a dotted-path glob."""
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
                raise _PatternSyntaxError(f"'[' at position {i} has no closing ']'")
            out.append(_class_regex(glob[i + 1 : end]))
            i = end + 1
        else:
            out.append(re.escape(glob[i]))
            i += 1
    return "".join(out)


def _compile_match(pattern: str) -> tuple[bool, re.Pattern[str]]:
    """(is_regex, compiled) for a rule's `match` value."""
    if pattern.startswith("re:"):
        source, is_regex = pattern[3:], True
        if not source:
            raise _PatternSyntaxError("empty regular expression after 're:'")
    else:
        source, is_regex = _glob_to_regex(pattern), False
    try:
        return is_regex, re.compile(source)
    except (re.error, OverflowError, RecursionError, ValueError) as exc:
        what = "regular expression" if is_regex else "glob"
        raise _PatternSyntaxError(f"bad {what}: {exc}") from None


def _path_prefixes(module_path: str) -> Iterable[str]:
    """The module path and every ancestor path, root ('') first."""
    parts = module_path.split(".") if module_path else []
    return (".".join(parts[:i]) for i in range(len(parts) + 1))


# --------------------------------------------------------------------------
# The validated policy
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class DilatedSpec:
    """Dilated attention: one (segment length, dilation rate) pattern per entry."""

    segment_lengths: tuple[int, ...]
    dilation_rates: tuple[int, ...]
    head_split: str = "groups"  # "groups" | "longnet"

    def describe(self) -> str:
        """Short text, e.g. ``w=[2048,4096] r=[1,2] longnet``."""
        w = ",".join(map(str, self.segment_lengths))
        r = ",".join(map(str, self.dilation_rates))
        return f"w=[{w}] r=[{r}] {self.head_split}"


@dataclass(frozen=True)
class BlockPattern:
    """Which key blocks each query block attends to (SPEC section 4)."""

    kind: str  # "local_window" | "dilated" | "global_local" | "mask_mod"
    window: int | None = None
    stride: int | None = None
    global_blocks: int | None = None
    function: str | None = None  # mask_mod: "package.module:name"

    def as_tuple(self) -> tuple:
        """The fields in order: ``BlockPattern(*p.as_tuple()) == p`` (plain values for caches
        and Dynamo constants)."""
        return (self.kind, self.window, self.stride, self.global_blocks, self.function)

    def describe(self) -> str:
        """Short text, e.g. ``local_window(window=2)``."""
        if self.kind == "mask_mod":
            return f"mask_mod({self.function})"
        fields = [
            f"{name}={getattr(self, name)}"
            for name in ("global_blocks", "stride", "window")
            if getattr(self, name) is not None
        ]
        return f"{self.kind}({', '.join(fields)})"


@dataclass(frozen=True)
class BlockSparseSpec:
    """Block-sparse attention: block size and pattern."""

    block_size: int
    pattern: BlockPattern

    def describe(self) -> str:
        """Short text, e.g. ``b=128 local_window(window=2)``."""
        return f"b={self.block_size} {self.pattern.describe()}"


@dataclass(frozen=True)
class RingSpec:
    """Ring attention over a process group (SPEC section 5)."""

    layout: str = "contiguous"  # "contiguous" | "zigzag"
    group: str | None = None  # name given to dilated_compile.register_group; None = world

    def describe(self) -> str:
        """Short text, e.g. ``ring=zigzag@tp``."""
        return f"ring={self.layout}" + (f"@{self.group}" if self.group else "")


@dataclass(frozen=True)
class Rule:
    """One entry of ``rules``: which sites it targets and what they become.

    ``match`` is kept as written. A pattern starting with ``"re:"`` is a
    Python regular expression applied with :func:`re.search` to the dotted
    module path (so it matches anywhere unless anchored with ``^``/``$``).
    Any other pattern is a glob over dotted paths that must match a whole
    path: ``*`` matches one or more characters within one component (no
    dots), ``**`` any run of characters including dots (as a whole component,
    as in ``a.**.b`` or ``**.attn``, it matches zero or more components),
    ``?`` one non-dot character, ``[...]`` (``[!...]`` negated) one non-dot
    character of a class. A glob rule matches a site when it matches the
    site's module path or any ancestor path of it (``encoder.layer.0``
    matches ``encoder.layer.0.attention.self``). The root module's path is
    ``""``.
    """

    match: str
    attention: str  # "dense" | "dilated" | "block_sparse"
    min_seq_len: int = 0
    dilated: DilatedSpec | None = None
    block_sparse: BlockSparseSpec | None = None
    ring: RingSpec | None = None
    index: int = 0
    line: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.match, str):
            raise PolicyError(f"got {_show(self.match)}", key="match", expected="a glob or 're:<regex>'")
        try:
            compiled = _compile_match(self.match)
        except _PatternSyntaxError as exc:
            raise PolicyError(str(exc), key="match", expected="a glob or 're:<regex>'") from None
        object.__setattr__(self, "_compiled", compiled)

    def matches(self, module_path: str) -> bool:
        """Whether this rule targets a site owned by the module at `module_path`."""
        is_regex, compiled = self._compiled  # type: ignore[attr-defined]
        if is_regex:
            return compiled.search(module_path) is not None
        return any(compiled.fullmatch(p) is not None for p in _path_prefixes(module_path))

    def describe(self) -> str:
        """One line, e.g. ``rules[0] 'transformer.h.*.attn' -> dilated w=[2048,4096] r=[1,2] longnet``."""
        text = f"rules[{self.index}] '{self.match}' -> {self.attention}"
        if self.dilated is not None:
            text += " " + self.dilated.describe()
        if self.block_sparse is not None:
            text += " " + self.block_sparse.describe()
        if self.ring is not None:
            text += " " + self.ring.describe()
        if self.min_seq_len:
            text += f" min_seq_len={self.min_seq_len}"
        return text


@dataclass(frozen=True)
class Policy:
    """A validated policy: rules in order (first match wins)."""

    version: int
    strict: bool
    rules: tuple[Rule, ...]
    source: str  # file path as given, or '<dict>'
    digest: str  # sha256 of the validated content; equal content, equal digest

    def rule_for(self, module_path: str) -> Rule | None:
        """The first rule whose ``match`` fits `module_path` (see :class:`Rule`), or None."""
        for rule in self.rules:
            if rule.matches(module_path):
                return rule
        return None


# --------------------------------------------------------------------------
# Reading YAML with line numbers
# --------------------------------------------------------------------------

_MAP_TAG = "tag:yaml.org,2002:map"
_SEQ_TAG = "tag:yaml.org,2002:seq"
_MERGE_TAG = "tag:yaml.org,2002:merge"


class _Context:
    """Where values came from: the file and a map from dotted key to line."""

    def __init__(self, file: str, lines: dict[str, int] | None = None) -> None:
        self.file = file
        self.lines: dict[str, int] = lines if lines is not None else {}

    def line_of(self, path: str) -> int | None:
        """Line of `path`, or of its nearest ancestor that has one."""
        while True:
            if path in self.lines:
                return self.lines[path]
            if not path:
                return None
            path = _parent_path(path)

    def error(self, path: str, message: str, expected: str | None = None) -> PolicyError:
        """A PolicyError located at `path`."""
        return PolicyError(message, self.file, self.line_of(path), path or None, expected)


def _parent_path(path: str) -> str:
    """The dotted path one level up ('' at the top)."""
    if path.endswith("]"):
        cut = path.rfind("[")
    else:
        cut = path.rfind(".")
    return path[:cut] if cut > 0 else ""


def _child_path(path: str, key: object) -> str:
    """Dotted path of mapping entry `key` under `path`."""
    return f"{path}.{key}" if path else str(key)


def _line(node: yaml.Node) -> int:
    """1-based line where `node` starts."""
    return node.start_mark.line + 1


class _Builder:
    """Builds Python values from a composed YAML node tree, recording lines."""

    def __init__(self, loader: yaml.SafeLoader, ctx: _Context) -> None:
        self.loader = loader
        self.ctx = ctx
        self.visits = 0
        self.active: set[int] = set()

    def fail(self, node: yaml.Node, path: str, message: str, expected: str | None = None) -> PolicyError:
        """A PolicyError at `node`'s line."""
        return PolicyError(message, self.ctx.file, _line(node), path or None, expected)

    def build(self, node: yaml.Node, path: str) -> Any:
        """The value of `node`, found at dotted key `path`."""
        self.visits += 1
        if self.visits > _MAX_NODES or len(self.active) > _MAX_DEPTH:
            raise self.fail(node, path, "document too large or too deeply nested (aliases included)")
        if id(node) in self.active:
            raise self.fail(node, path, "recursive alias", "a tree without self-reference")
        self.ctx.lines.setdefault(path, _line(node))
        self.active.add(id(node))
        try:
            if isinstance(node, yaml.MappingNode) and node.tag == _MAP_TAG:
                return self.build_mapping(node, path)
            if isinstance(node, yaml.SequenceNode) and node.tag == _SEQ_TAG:
                return [self.build(item, f"{path}[{i}]") for i, item in enumerate(node.value)]
            return self.construct(node, path)
        finally:
            self.active.discard(id(node))

    def construct(self, node: yaml.Node, path: str) -> Any:
        """A scalar or specially tagged value, built by the safe constructor."""
        try:
            return self.loader.construct_object(node, deep=True)
        except Exception as exc:  # the safe constructor raises several types
            problem = getattr(exc, "problem", None) or str(exc)
            raise self.fail(node, path, f"cannot read value: {problem}", "a plain YAML value") from None

    def key_of(self, node: yaml.Node, path: str) -> Any:
        """A mapping key: a hashable scalar."""
        if not isinstance(node, yaml.ScalarNode):
            raise self.fail(node, path, "a mapping key must be a plain scalar", "a string key")
        key = self.construct(node, path)
        try:
            hash(key)
        except TypeError:
            raise self.fail(node, path, "a mapping key must be a plain scalar", "a string key") from None
        return key

    def build_mapping(self, node: yaml.MappingNode, path: str) -> dict[Any, Any]:
        """A mapping; duplicate keys are errors, ``<<`` merges fill absent keys."""
        result: dict[Any, Any] = {}
        first_line: dict[Any, int] = {}
        merges: list[yaml.Node] = []
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE_TAG:
                merges.append(value_node)
                continue
            key = self.key_of(key_node, path)
            child = _child_path(path, key)
            if key in first_line:
                raise self.fail(
                    key_node, child, f"duplicate key {key!r} (first at line {first_line[key]})",
                    "each key once per mapping",
                )
            first_line[key] = _line(key_node)
            self.ctx.lines.setdefault(child, _line(key_node))
            result[key] = self.build(value_node, child)
        for source in merges:
            self.merge_into(result, source, path)
        return result

    def merge_into(self, result: dict[Any, Any], source: yaml.Node, path: str) -> None:
        """Apply a ``<<`` merge: keys of the merged mapping(s) that are absent."""
        sources = source.value if isinstance(source, yaml.SequenceNode) else [source]
        for item in sources:
            if not (isinstance(item, yaml.MappingNode) and item.tag == _MAP_TAG):
                raise self.fail(item, path, "'<<' must merge a mapping or a list of mappings", "a mapping")
            for key, value in self.build(item, path).items():
                result.setdefault(key, value)


def _yaml_error(exc: yaml.YAMLError, text: str, file: str) -> PolicyError:
    """PolicyError for a YAML syntax or reader error."""
    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else None
        parts = [p for p in (exc.context, exc.problem) if p]
        message = "YAML syntax error: " + (", ".join(parts) or str(exc))
        return PolicyError(message, file, line, None, "valid YAML")
    if isinstance(exc, yaml.reader.ReaderError):
        line = text.count("\n", 0, max(exc.position, 0)) + 1
        return PolicyError(f"YAML cannot read character {exc.character!r}: {exc.reason}", file, line, None, "printable text")
    return PolicyError(f"YAML error: {exc}", file, None, None, "valid YAML")


def _decode(raw: bytes, file: str) -> str:
    """The text of a policy file (UTF-8, or UTF-16 with a byte-order mark)."""
    try:
        if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
            return raw.decode("utf-16")
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise PolicyError(f"not valid text: {exc.reason} at byte {exc.start}", file, line, None, "UTF-8 text") from None


def _parse_yaml(text: str, file: str) -> tuple[Any, _Context]:
    """The document in `text` and the line of every dotted key."""
    ctx = _Context(file)
    loader: yaml.SafeLoader | None = None
    try:
        loader = yaml.SafeLoader(text)  # checks the characters already
        node = loader.get_single_node()
        if node is None:
            raise PolicyError("empty policy file", file, None, None, "a mapping with 'version: 1' and 'rules'")
        return _Builder(loader, ctx).build(node, ""), ctx
    except yaml.YAMLError as exc:
        raise _yaml_error(exc, text, file) from None
    except RecursionError:
        raise PolicyError("document nested too deeply", file, None, None, "a policy document") from None
    finally:
        if loader is not None:
            loader.dispose()


def _read_file(path: str | os.PathLike[str] | bytes) -> tuple[Any, _Context]:
    """Read and parse a policy file."""
    file = os.fsdecode(path)
    try:
        with open(path, "rb") as handle:
            raw = handle.read()
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise PolicyError(f"cannot read policy file: {reason}", file, None, None, "a readable YAML file") from None
    return _parse_yaml(_decode(raw, file), file)


# --------------------------------------------------------------------------
# Validating values
# --------------------------------------------------------------------------


def _show(value: Any) -> str:
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


def _one_of(choices: Iterable[str]) -> str:
    """``one of: a, b, c``."""
    return "one of: " + ", ".join(choices)


def _did_you_mean(word: Any, choices: Sequence[str]) -> str:
    """``; did you mean 'x'?`` when a choice is close to `word`, else ''."""
    close = difflib.get_close_matches(str(word), list(choices), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def _is_int(value: Any) -> bool:
    """An integer that is not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _int(ctx: _Context, value: Any, path: str, minimum: int) -> int:
    """An int >= `minimum`."""
    expected = f"an integer >= {minimum}"
    if not _is_int(value):
        raise ctx.error(path, f"got {_show(value)}", expected)
    if value < minimum:
        raise ctx.error(path, f"got {value}", expected)
    return int(value)


def _bool(ctx: _Context, value: Any, path: str) -> bool:
    """A bool."""
    if not isinstance(value, bool):
        raise ctx.error(path, f"got {_show(value)}", "true or false")
    return value


def _choice(ctx: _Context, value: Any, path: str, choices: Sequence[str], hint: str = "") -> str:
    """A string among `choices`."""
    if not isinstance(value, str):
        raise ctx.error(path, f"got {_show(value)}", "a string, " + _one_of(choices))
    if value not in choices:
        raise ctx.error(path, f"unknown value {value!r}{_did_you_mean(value, choices) or hint}", _one_of(choices))
    return value


def _mapping(ctx: _Context, value: Any, path: str, expected: str) -> Mapping[Any, Any]:
    """A mapping."""
    if not isinstance(value, Mapping):
        raise ctx.error(path, f"got {_show(value)}", expected)
    return value


def _positive_ints(ctx: _Context, value: Any, path: str) -> tuple[int, ...]:
    """A non-empty list of ints >= 1."""
    expected = "a non-empty list of positive integers"
    if not isinstance(value, (list, tuple)):
        raise ctx.error(path, f"got {_show(value)}", expected)
    if not value:
        raise ctx.error(path, "empty list", expected)
    return tuple(_int(ctx, item, f"{path}[{i}]", 1) for i, item in enumerate(value))


def _check_keys(ctx: _Context, mapping: Mapping[Any, Any], path: str, allowed: Sequence[str]) -> None:
    """Every key of `mapping` is in `allowed`."""
    for key in mapping:
        if key not in allowed:
            hint = _did_you_mean(key, allowed)
            raise ctx.error(_child_path(path, key), f"unknown key{hint}", _one_of(sorted(allowed)))


def _missing(ctx: _Context, path: str, why: str, expected: str) -> PolicyError:
    """PolicyError for a required key that is absent."""
    return ctx.error(path, f"missing{why}", expected)


# --------------------------------------------------------------------------
# Validating fields
# --------------------------------------------------------------------------


def _match(ctx: _Context, value: Any, path: str) -> str:
    """A rule's `match`: a non-empty glob or 're:' regex that compiles."""
    expected = "a glob like 'transformer.h.*.attn' or 're:<regular expression>'"
    if not isinstance(value, str):
        raise ctx.error(path, f"got {_show(value)}", expected)
    if not value:
        raise ctx.error(path, "empty pattern", expected)
    try:
        _compile_match(value)
    except _PatternSyntaxError as exc:
        raise ctx.error(path, str(exc), expected) from None
    return value


_ATTENTION_HINT = "; ring is its own key: e.g. 'attention: dense' with 'ring: {}'?"


def _attention(ctx: _Context, value: Any, path: str) -> str:
    """dense | dilated | block_sparse."""
    hint = _ATTENTION_HINT if isinstance(value, str) and value == "ring" else ""
    return _choice(ctx, value, path, ATTENTION_KINDS, hint)


def _min_seq_len(ctx: _Context, value: Any, path: str) -> int:
    """An int >= 0."""
    return _int(ctx, value, path, 0)


def _head_split(ctx: _Context, value: Any, path: str) -> str:
    """groups | longnet."""
    return _choice(ctx, value, path, HEAD_SPLITS)


def _block_size(ctx: _Context, value: Any, path: str) -> int:
    """An int >= 1."""
    return _int(ctx, value, path, 1)


def _import_callable(ctx: _Context, spec: str, path: str) -> None:
    """Import ``package.module:name`` and check that it is callable."""
    expected = "'package.module:name' naming an importable callable"
    module_name, _, attr_path = spec.partition(":")
    try:
        target: Any = importlib.import_module(module_name)
    except Exception as exc:  # importing runs arbitrary module code
        raise ctx.error(path, f"cannot import module {module_name!r}: {type(exc).__name__}: {exc}", expected) from None
    for attr in attr_path.split("."):
        try:
            target = getattr(target, attr)
        except Exception:
            raise ctx.error(path, f"module {module_name!r} has no attribute {attr_path!r}", expected) from None
    if not callable(target):
        raise ctx.error(path, f"{spec!r} is {_show(target)}, not callable", expected)


def _mask_mod_function(ctx: _Context, value: Any, path: str) -> str:
    """A 'package.module:name' string naming a callable."""
    expected = "'package.module:name' naming an importable callable"
    if not isinstance(value, str):
        raise ctx.error(path, f"got {_show(value)}", expected)
    module_name, colon, attr_path = value.partition(":")
    parts = module_name.split(".") + attr_path.split(".")
    if not colon or not all(part.isidentifier() for part in parts):
        raise ctx.error(path, f"got {value!r}", expected)
    _import_callable(ctx, value, path)
    return value


_PATTERN_FIELDS: dict[str, tuple[Callable[..., Any], tuple[Any, ...]]] = {
    "window": (_int, (0,)),
    "stride": (_int, (1,)),
    "global_blocks": (_int, (1,)),
    "function": (_mask_mod_function, ()),
}


def _pattern(ctx: _Context, value: Any, path: str) -> BlockPattern:
    """A block-sparse pattern mapping (SPEC section 4)."""
    m = _mapping(ctx, value, path, "a mapping like {kind: local_window, window: 2}")
    _check_keys(ctx, m, path, _ALL_PATTERN_KEYS)
    if "kind" not in m:
        raise _missing(ctx, f"{path}.kind", "", _one_of(PATTERN_KINDS))
    kind = _choice(ctx, m["kind"], f"{path}.kind", PATTERN_KINDS)
    needed = _PATTERN_KEYS[kind]
    for key in m:
        if key != "kind" and key not in needed:
            owners = [k for k, keys in _PATTERN_KEYS.items() if key in keys]
            raise ctx.error(
                f"{path}.{key}", f"applies only to kind: {', '.join(owners)}",
                f"keys for kind: {kind}: " + ", ".join(("kind",) + needed),
            )
    fields: dict[str, Any] = {}
    for key in needed:
        if key not in m:
            raise _missing(ctx, f"{path}.{key}", f" (required for kind: {kind})", f"a value for {key}")
        check, args = _PATTERN_FIELDS[key]
        fields[key] = check(ctx, m[key], f"{path}.{key}", *args)
    return BlockPattern(kind=kind, **fields)


def _ring(ctx: _Context, value: Any, path: str) -> RingSpec:
    """A ring mapping; ``{}`` is ring with defaults."""
    m = _mapping(ctx, value, path, "a mapping like {layout: zigzag} (use 'ring: {}' for ring with default settings)")
    _check_keys(ctx, m, path, _RING_KEYS)
    layout = _choice(ctx, m.get("layout", "contiguous"), f"{path}.layout", RING_LAYOUTS)
    group = m.get("group")
    if group is not None and (not isinstance(group, str) or not group):
        raise ctx.error(f"{path}.group", f"got {_show(group)}", "a non-empty process group name given to register_group, or null")
    return RingSpec(layout=layout, group=group)


_FIELDS: dict[str, Callable[[_Context, Any, str], Any]] = {
    "match": _match,
    "attention": _attention,
    "min_seq_len": _min_seq_len,
    "segment_lengths": _positive_ints,
    "dilation_rates": _positive_ints,
    "head_split": _head_split,
    "block_size": _block_size,
    "pattern": _pattern,
    "ring": _ring,
}

_REQUIRED_EXPECTED = {
    "segment_lengths": "a non-empty list of positive integers",
    "dilation_rates": "a non-empty list of positive integers",
    "block_size": "an integer >= 1",
    "pattern": "a mapping like {kind: local_window, window: 2}",
}


# --------------------------------------------------------------------------
# Validating the document
# --------------------------------------------------------------------------

# An entry of a rule after merging defaults: (value, dotted key it came from).
_Entries = dict[str, tuple[Any, str]]


def _field(ctx: _Context, entries: _Entries, key: str) -> Any:
    """Validated value of entry `key`."""
    value, path = entries[key]
    return _FIELDS[key](ctx, value, path)


def _required(ctx: _Context, entries: _Entries, key: str, rule_path: str, kind: str) -> Any:
    """Validated value of a key that `kind` needs."""
    if key not in entries:
        raise _missing(ctx, f"{rule_path}.{key}", f" (required for attention: {kind})", _REQUIRED_EXPECTED[key])
    return _field(ctx, entries, key)


def _dilated(ctx: _Context, entries: _Entries, rule_path: str) -> DilatedSpec:
    """The dilated part of a rule."""
    segments = _required(ctx, entries, "segment_lengths", rule_path, "dilated")
    rates = _required(ctx, entries, "dilation_rates", rule_path, "dilated")
    if len(segments) != len(rates):
        rates_path = entries["dilation_rates"][1]
        raise ctx.error(
            rates_path,
            f"has {len(rates)} entries but segment_lengths ({entries['segment_lengths'][1]}) has {len(segments)}",
            "one dilation rate per segment length",
        )
    head_split = _field(ctx, entries, "head_split") if "head_split" in entries else "groups"
    return DilatedSpec(segment_lengths=segments, dilation_rates=rates, head_split=head_split)


def _block_sparse(ctx: _Context, entries: _Entries, rule_path: str) -> BlockSparseSpec:
    """The block-sparse part of a rule."""
    block_size = _required(ctx, entries, "block_size", rule_path, "block_sparse")
    pattern = _required(ctx, entries, "pattern", rule_path, "block_sparse")
    return BlockSparseSpec(block_size=block_size, pattern=pattern)


def _check_kind_keys(ctx: _Context, rule: Mapping[Any, Any], path: str, kind: str) -> None:
    """Every key the rule sets itself applies to its attention kind."""
    allowed = _KIND_KEYS[kind]
    for key in rule:
        if key not in allowed:
            owners = [k for k, keys in _KIND_KEYS.items() if key in keys]
            raise ctx.error(
                f"{path}.{key}", f"applies only to attention: {', '.join(owners)}",
                f"keys for attention: {kind}: " + ", ".join(sorted(allowed)),
            )


def _rule(ctx: _Context, value: Any, index: int, defaults: _Entries) -> Rule:
    """One validated rule, defaults merged under it."""
    path = f"rules[{index}]"
    m = _mapping(ctx, value, path, "a mapping with at least 'match' and 'attention'")
    _check_keys(ctx, m, path, _RULE_KEYS)
    entries: _Entries = {key: (val, f"{path}.{key}") for key, val in m.items()}
    if "match" not in entries:
        raise _missing(ctx, f"{path}.match", "", "a glob or 're:<regular expression>' naming module paths")
    match = _field(ctx, entries, "match")
    if "attention" not in entries and "attention" in defaults:
        entries["attention"] = defaults["attention"]
    if "attention" not in entries:
        raise _missing(ctx, f"{path}.attention", "", _one_of(ATTENTION_KINDS))
    kind = _field(ctx, entries, "attention")
    _check_kind_keys(ctx, m, path, kind)
    for key, entry in defaults.items():
        if key in _KIND_KEYS[kind]:
            entries.setdefault(key, entry)
    return Rule(
        match=match,
        attention=kind,
        min_seq_len=_field(ctx, entries, "min_seq_len") if "min_seq_len" in entries else 0,
        dilated=_dilated(ctx, entries, path) if kind == "dilated" else None,
        block_sparse=_block_sparse(ctx, entries, path) if kind == "block_sparse" else None,
        ring=_field(ctx, entries, "ring") if "ring" in entries else None,
        index=index,
        line=ctx.line_of(path),
    )


def _defaults(ctx: _Context, value: Any) -> _Entries:
    """The validated ``defaults`` mapping, as entries."""
    if value is None:
        return {}
    m = _mapping(ctx, value, "defaults", "a mapping of rule keys")
    for key in m:
        if key == "match":
            raise ctx.error("defaults.match", "match cannot have a default; every rule sets its own", _one_of(_DEFAULT_KEYS))
    _check_keys(ctx, m, "defaults", _DEFAULT_KEYS)
    entries: _Entries = {key: (val, f"defaults.{key}") for key, val in m.items()}
    for key in entries:
        _field(ctx, entries, key)
    return entries


def _check_defaults_used(ctx: _Context, defaults: _Entries, rules: Sequence[Rule]) -> None:
    """Every defaults key is relevant to at least one rule."""
    kinds = {rule.attention for rule in rules}
    for key, (_, path) in defaults.items():
        owners = [k for k, keys in _KIND_KEYS.items() if key in keys]
        if not kinds.intersection(owners):
            wanted = " or ".join(f"attention: {k}" for k in owners)
            raise ctx.error(path, f"applies to no rule: no rule has {wanted}", f"a rule with {wanted}, or no {path}")


def _version(ctx: _Context, root: Mapping[Any, Any]) -> int:
    """The schema version; only 1 exists."""
    expected = f"version: {SCHEMA_VERSION}"
    if "version" not in root:
        raise _missing(ctx, "version", "", expected)
    value = root["version"]
    if not _is_int(value) or value != SCHEMA_VERSION:
        raise ctx.error("version", f"unsupported version: got {_show(value)}", f"{SCHEMA_VERSION} (written {expected})")
    return SCHEMA_VERSION


def _rules_list(ctx: _Context, root: Mapping[Any, Any]) -> Sequence[Any]:
    """The raw ``rules`` list, non-empty."""
    expected = "a non-empty list of rules (mappings with 'match' and 'attention')"
    if "rules" not in root:
        raise _missing(ctx, "rules", "", expected)
    value = root["rules"]
    if not isinstance(value, (list, tuple)):
        raise ctx.error("rules", f"got {_show(value)}", expected)
    if not value:
        raise ctx.error("rules", "empty list", expected)
    return value


def _canonical(version: int, strict: bool, rules: Sequence[Rule]) -> str:
    """Canonical JSON of the validated content (no file, no line numbers)."""
    content = {
        "version": version,
        "strict": strict,
        "rules": [
            {k: v for k, v in dataclasses.asdict(rule).items() if k not in ("index", "line")}
            for rule in rules
        ],
    }
    return json.dumps(content, sort_keys=True, separators=(",", ":"))


def _build_policy(value: Any, ctx: _Context) -> Policy:
    """Validate a parsed document into a Policy."""
    root = _mapping(ctx, value, "", "a mapping with keys: " + ", ".join(sorted(_TOP_KEYS)))
    _check_keys(ctx, root, "", _TOP_KEYS)
    version = _version(ctx, root)
    strict = _bool(ctx, root["strict"], "strict") if "strict" in root else False
    defaults = _defaults(ctx, root.get("defaults"))
    rules = tuple(_rule(ctx, raw, i, defaults) for i, raw in enumerate(_rules_list(ctx, root)))
    _check_defaults_used(ctx, defaults, rules)
    digest = hashlib.sha256(_canonical(version, strict, rules).encode("utf-8")).hexdigest()
    return Policy(version=version, strict=strict, rules=rules, source=ctx.file, digest=digest)


def load_policy(policy: "str | os.PathLike[str] | Mapping[str, Any] | Policy") -> Policy:
    """Load and validate a policy: a YAML file path, a dict of the same shape, or a Policy (returned as is).

    Raises PolicyError, and no other exception, for anything wrong with it.
    """
    if isinstance(policy, Policy):
        return policy
    if isinstance(policy, Mapping):
        return _build_policy(policy, _Context(_DICT_SOURCE))
    if isinstance(policy, (str, bytes, os.PathLike)):
        value, ctx = _read_file(policy)
        return _build_policy(value, ctx)
    raise PolicyError(
        f"got {_show(policy)}", None, None, None,
        "a path to a YAML policy file, a dict of the same shape, or a Policy",
    )
