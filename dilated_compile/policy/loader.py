"""Reading a policy file: YAML into plain values, with the line of every key.

:func:`read_file` and :func:`parse_yaml` return the document (dicts, lists
and scalars, as :func:`yaml.safe_load` would give) and a :class:`Where`
that knows the line each dotted key (``rules[0].pattern.window``) starts
on. Anything unreadable is a :class:`PolicyError` with the file and line:
bad bytes, YAML syntax, duplicate keys, a recursive alias, a document too
large. Anchors, aliases and ``<<`` merge keys are allowed.
"""

from __future__ import annotations

import os
from typing import Any

import yaml

from .errors import PolicyError, Where, child_key

__all__ = ["read_file", "parse_yaml"]

_MAX_NODES = 100_000
_MAX_DEPTH = 200

_MAP_TAG = "tag:yaml.org,2002:map"
_SEQ_TAG = "tag:yaml.org,2002:seq"
_MERGE_TAG = "tag:yaml.org,2002:merge"


def _line(node: yaml.Node) -> int:
    """1-based line where `node` starts."""
    return node.start_mark.line + 1


class _Builder:
    """Builds Python values from a composed YAML node tree, recording lines."""

    def __init__(self, loader: yaml.SafeLoader, where: Where) -> None:
        self.loader = loader
        self.where = where
        self.visits = 0
        self.active: set[int] = set()

    def fail(self, node: yaml.Node, path: str, message: str, expected: str | None = None) -> PolicyError:
        """A PolicyError at `node`'s line."""
        return PolicyError(message, self.where.file, _line(node), path or None, expected)

    def build(self, node: yaml.Node, path: str) -> Any:
        """The value of `node`, found at dotted key `path`."""
        self.visits += 1
        if self.visits > _MAX_NODES or len(self.active) > _MAX_DEPTH:
            raise self.fail(node, path, "document too large or too deeply nested (aliases included)")
        if id(node) in self.active:
            raise self.fail(node, path, "recursive alias", "a tree without self-reference")
        self.where.lines.setdefault(path, _line(node))
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
            child = child_key(path, key)
            if key in first_line:
                raise self.fail(
                    key_node, child, f"duplicate key {key!r} (first at line {first_line[key]})",
                    "each key once per mapping",
                )
            first_line[key] = _line(key_node)
            self.where.lines.setdefault(child, _line(key_node))
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


def parse_yaml(text: str, file: str) -> tuple[Any, Where]:
    """The document in `text` and the line of every dotted key."""
    where = Where(file)
    loader: yaml.SafeLoader | None = None
    try:
        loader = yaml.SafeLoader(text)  # checks the characters already
        node = loader.get_single_node()
        if node is None:
            raise PolicyError("empty policy file", file, None, None, "a mapping with 'version: 1' and 'rules'")
        return _Builder(loader, where).build(node, ""), where
    except yaml.YAMLError as exc:
        raise _yaml_error(exc, text, file) from None
    except RecursionError:
        raise PolicyError("document nested too deeply", file, None, None, "a policy document") from None
    finally:
        if loader is not None:
            loader.dispose()


def read_file(path: str | os.PathLike[str] | bytes) -> tuple[Any, Where]:
    """Read and parse a policy file."""
    file = os.fsdecode(path)
    try:
        with open(path, "rb") as handle:
            raw = handle.read()
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise PolicyError(f"cannot read policy file: {reason}", file, None, None, "a readable YAML file") from None
    return parse_yaml(_decode(raw, file), file)


