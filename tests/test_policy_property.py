"""Property tests: whatever the document, load_policy returns a Policy or raises PolicyError."""

from __future__ import annotations

import copy
import itertools
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from dilated_compile.policy import Policy, PolicyError, load_policy

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

SCHEMA_WORDS = [
    "version", "strict", "defaults", "rules", "match", "attention", "min_seq_len", "segment_lengths",
    "dilation_rates", "head_split", "block_size", "pattern", "ring", "kind", "window", "stride",
    "global_blocks", "function", "layout", "group", "dense", "dilated", "block_sparse", "groups", "longnet",
    "local_window", "global_local", "mask_mod", "contiguous", "zigzag", "re:^a\\.", "**", "a.*.b",
    "operator:and_",
]

# Short text only: a random string must not name some heavy module that mask_mod would import.
short_text = st.text(max_size=8)
keys = st.sampled_from(SCHEMA_WORDS) | short_text
scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-3, max_value=70000)
    | st.integers()
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.sampled_from(SCHEMA_WORDS)
    | short_text
)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=4),
    max_leaves=12,
)

VALID_DOCS: list[dict[str, Any]] = [
    {
        "version": 1,
        "strict": False,
        "defaults": {"min_seq_len": 4096},
        "rules": [
            {"match": "transformer.h.*.attn", "attention": "dilated", "segment_lengths": [2048, 4096, 8192],
             "dilation_rates": [1, 2, 4], "head_split": "longnet", "ring": {"layout": "zigzag"}},
            {"match": "re:^encoder\\.layer\\.[0-3]\\.", "attention": "block_sparse", "block_size": 128,
             "pattern": {"kind": "local_window", "window": 2}},
        ],
    },
    {
        "version": 1,
        "strict": True,
        "defaults": {"attention": "block_sparse", "block_size": 64, "ring": {"group": "sp"}},
        "rules": [
            {"match": "a.**", "pattern": {"kind": "dilated", "stride": 4, "window": 1}},
            {"match": "b.?", "pattern": {"kind": "global_local", "global_blocks": 2, "window": 0}},
            {"match": "c.[0-3]", "pattern": {"kind": "mask_mod", "function": "operator:and_"}},
            {"match": "d", "attention": "dense", "min_seq_len": 0},
        ],
    },
    {
        "version": 1,
        "defaults": {"segment_lengths": [2048, 4096, 8192, 16384, 32768], "dilation_rates": [1, 2, 4, 6, 12]},
        "rules": [{"match": "**", "attention": "dilated", "head_split": "groups", "ring": {}}],
    },
]


def _locations(doc: Any, prefix: tuple = ()) -> list[tuple]:
    """Every (container path, key or index) inside `doc`."""
    found: list[tuple] = []
    if isinstance(doc, dict):
        items: Any = doc.items()
    elif isinstance(doc, list):
        items = enumerate(doc)
    else:
        return found
    for key, value in items:
        found.append(prefix + (key,))
        found.extend(_locations(value, prefix + (key,)))
    return found


def _typo(word: str, data: st.DataObject) -> str:
    """`word` with one character dropped, doubled or swapped."""
    if not word:
        return "x"
    i = data.draw(st.integers(0, len(word) - 1))
    how = data.draw(st.sampled_from(["drop", "double", "swap", "upper"]))
    if how == "drop":
        return word[:i] + word[i + 1:]
    if how == "double":
        return word[:i] + word[i] + word[i:]
    if how == "upper":
        return word[:i] + word[i].upper() + word[i + 1:]
    j = min(i + 1, len(word) - 1)
    chars = list(word)
    chars[i], chars[j] = chars[j], chars[i]
    return "".join(chars)


def _mutate(doc: dict[str, Any], data: st.DataObject) -> dict[str, Any]:
    """A copy of `doc` with a few keys dropped or renamed and values replaced."""
    doc = copy.deepcopy(doc)
    for _ in range(data.draw(st.integers(1, 3))):
        locations = _locations(doc)
        if not locations:
            break
        where = data.draw(st.sampled_from(locations))
        parent: Any = doc
        for step in where[:-1]:
            parent = parent[step]
        last = where[-1]
        op = data.draw(st.sampled_from(["drop", "rename", "typo", "replace", "replace"]))
        if op == "drop":
            del parent[last]
        elif op in ("rename", "typo") and isinstance(parent, dict):
            new = data.draw(keys) if op == "rename" else _typo(str(last), data)
            value = parent.pop(last)
            parent[new] = value
        else:
            parent[last] = data.draw(scalars | json_values)
    return doc


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("policy_property")


_counter = itertools.count()


def _write(workdir: Path, content: str | bytes) -> Path:
    """A fresh file holding `content`."""
    path = workdir / f"p{next(_counter)}.yaml"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


def _outcome(policy: Any, file: str) -> Policy | PolicyError:
    """What load_policy gives: a Policy or a PolicyError (anything else fails the test)."""
    try:
        result = load_policy(policy)
    except PolicyError as err:
        assert err.file == file
        assert err.line is None or (isinstance(err.line, int) and err.line >= 1)
        assert err.key is None or isinstance(err.key, str)
        assert str(err) and err.message
        if file == "<dict>":
            assert err.line is None
        return err
    assert isinstance(result, Policy)
    assert result.source == file and len(result.digest) == 64
    for path in ("", "a", "a.b", "transformer.h.1.attn", "encoder.layer.2.x"):
        rule = result.rule_for(path)
        assert rule is None or rule.describe().startswith(f"rules[{rule.index}]")
    return result


def _check_dict_and_file(doc: Any, workdir: Path) -> None:
    """Loading `doc` as a dict and as YAML text gives the same outcome."""
    from_dict = _outcome(doc, "<dict>")
    text = yaml.safe_dump(doc, sort_keys=False, allow_unicode=True)
    path = _write(workdir, text)
    from_file = _outcome(str(path), str(path))
    if yaml.safe_load(text) != doc:
        return  # YAML itself changed the document (e.g. a key '\x85' reads back as ' ')
    assert type(from_dict) is type(from_file), (from_dict, from_file)
    if isinstance(from_dict, Policy):
        assert from_dict.digest == from_file.digest
    else:
        assert (from_dict.key, from_dict.message, from_dict.expected) == (
            from_file.key, from_file.message, from_file.expected)


@example(doc={"\x85": None})
@SETTINGS
@given(doc=st.dictionaries(keys, json_values, max_size=6))
def test_random_mappings(doc: dict, workdir: Path) -> None:
    _check_dict_and_file(doc, workdir)


@SETTINGS
@given(
    doc=st.fixed_dictionaries(
        {"version": st.just(1) | json_values, "rules": st.lists(st.dictionaries(keys, json_values, max_size=6), max_size=3)},
        optional={"strict": json_values, "defaults": st.dictionaries(keys, json_values, max_size=4)},
    )
)
def test_random_rule_lists(doc: dict, workdir: Path) -> None:
    _check_dict_and_file(doc, workdir)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(base=st.sampled_from(VALID_DOCS), data=st.data())
def test_mutated_valid_policies(base: dict, data: st.DataObject, workdir: Path) -> None:
    _check_dict_and_file(_mutate(base, data), workdir)


@SETTINGS
@given(value=json_values)
def test_random_top_level_values(value: Any, workdir: Path) -> None:
    if isinstance(value, dict):
        _check_dict_and_file(value, workdir)
    else:
        path = _write(workdir, yaml.safe_dump(value))
        assert isinstance(_outcome(str(path), str(path)), PolicyError)


YAML_PIECES = [
    "version: 1\n", "rules:\n", "  - ", "match: a\n", "attention: dense\n", "    ", ":", "-", "[", "]", "{", "}",
    ",", "&a ", "*a", "<<: ", "!!str ", "!!binary ", "!foo ", "? ", "|\n", ">\n", "'", '"', "#", "\t", "\n",
    "---\n", "...\n", "%YAML 1.1\n", "%TAG ! tag:x,2000:\n", "1", "-1", "0x1F", "1e3", "~", "null", "yes", "2020-01-01",
    "\\", "\x00", "\ufeff", "\u2028",
]


@SETTINGS
@given(pieces=st.lists(st.sampled_from(YAML_PIECES) | short_text, max_size=30))
def test_yaml_like_text(pieces: list[str], workdir: Path) -> None:
    path = _write(workdir, "".join(pieces).encode("utf-8", "surrogatepass"))
    _outcome(str(path), str(path))


@SETTINGS
@given(text=st.text(max_size=200))
def test_random_text(text: str, workdir: Path) -> None:
    path = _write(workdir, text)
    _outcome(str(path), str(path))


@SETTINGS
@given(raw=st.binary(max_size=200))
def test_random_bytes(raw: bytes, workdir: Path) -> None:
    path = _write(workdir, raw)
    _outcome(str(path), str(path))


@settings(max_examples=50, deadline=None)
@given(value=st.integers() | st.floats() | st.lists(json_values, max_size=3) | st.none() | st.booleans())
def test_wrong_input_types(value: Any) -> None:
    with pytest.raises(PolicyError):
        load_policy(value)
