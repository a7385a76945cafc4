"""Errors in policies: a bad file or dict gives a PolicyError naming the file, line, key and
what to change; YAML syntax errors, files that are not text, empty or not a mapping; the error
object itself (a ValueError that pickles)."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from dilated_compile.policy import DilatedSpec, Policy, PolicyError, Rule, load_policy

from .policy_common import SPEC_EXAMPLE_DICT, error_of, file_error


# --------------------------------------------------------------------------
# Errors in files: file, line, key, message
# --------------------------------------------------------------------------

DILATED = """\
version: 1
rules:
  - match: "a.*"
    attention: dilated
    segment_lengths: [2048, 4096]
    dilation_rates: [1, 2]
"""


def mutate(old: str, new: str, base: str = DILATED) -> str:
    """`base` with one substring replaced (which must be there)."""
    assert old in base
    return base.replace(old, new)


# (document, line, key, fragments that str(e) must contain)
BAD_FILES = [
    # unknown keys, with and without a close match
    (mutate("segment_lengths:", "segment_lenghts:"), 5, "rules[0].segment_lenghts",
     ["unknown key; did you mean 'segment_lengths'?", "expected one of: attention, block_size, dilation_rates"]),
    (mutate("version: 1", "verison: 1"), 1, "verison", ["did you mean 'version'?", "one of: defaults, rules, strict, version"]),
    (mutate("version: 1", "version: 1\nfoo: 3"), 2, "foo", ["unknown key; expected one of: defaults, rules, strict, version"]),
    (mutate("version: 1", "version: 1\ndefaults: {min_seq_length: 3}"), 2, "defaults.min_seq_length",
     ["did you mean 'min_seq_len'?"]),
    (mutate("version: 1", "version: 1\ndefaults:\n  match: x"), 3, "defaults.match", ["match cannot have a default"]),
    (mutate("    dilation_rates: [1, 2]\n", "    dilation_rates: [1, 2]\n    ring: {layot: zigzag}\n"), 7,
     "rules[0].ring.layot", ["did you mean 'layout'?", "one of: group, layout"]),
    # unknown values
    (mutate("attention: dilated", "attention: dilatd"), 4, "rules[0].attention",
     ["unknown value 'dilatd'; did you mean 'dilated'?", "expected one of: dense, dilated, block_sparse"]),
    (mutate("attention: dilated", "attention: ring"), 4, "rules[0].attention", ["ring is its own key"]),
    (mutate("    dilation_rates: [1, 2]\n", "    dilation_rates: [1, 2]\n    head_split: long_net\n"), 7,
     "rules[0].head_split", ["did you mean 'longnet'?", "one of: groups, longnet"]),
    (mutate("    dilation_rates: [1, 2]\n", "    dilation_rates: [1, 2]\n    ring: {layout: zig-zag}\n"), 7,
     "rules[0].ring.layout", ["did you mean 'zigzag'?", "one of: contiguous, zigzag"]),
    # wrong types
    (mutate("segment_lengths: [2048, 4096]", "segment_lengths: 2048"), 5, "rules[0].segment_lengths",
     ["got an int (2048)", "expected a non-empty list of positive integers"]),
    (mutate("[2048, 4096]", "[2048.0, 4096]"), 5, "rules[0].segment_lengths[0]", ["got a float (2048.0)", "integer >= 1"]),
    (mutate("[2048, 4096]", "[2048, true]"), 5, "rules[0].segment_lengths[1]", ["got a boolean (True)"]),
    (mutate("[2048, 4096]", "['2048', 4096]"), 5, "rules[0].segment_lengths[0]", ["got a str ('2048')"]),
    (mutate("version: 1", "version: 1\nstrict: 'yes'"), 2, "strict", ["expected true or false"]),
    (mutate("version: 1", "version: 1\nstrict: 1"), 2, "strict", ["expected true or false"]),
    (mutate('"a.*"', "3"), 3, "rules[0].match", ["got an int (3)", "glob"]),
    (mutate("attention: dilated", "attention: [dilated]"), 4, "rules[0].attention", ["got a list"]),
    (mutate("    dilation_rates: [1, 2]\n", "    dilation_rates: [1, 2]\n    ring:\n"), 7, "rules[0].ring",
     ["got null", "ring: {}"]),
    (mutate("    dilation_rates: [1, 2]\n", "    dilation_rates: [1, 2]\n    ring: true\n"), 7, "rules[0].ring",
     ["got a boolean (True)"]),
    (mutate("    dilation_rates: [1, 2]\n", "    dilation_rates: [1, 2]\n    ring: {group: 5}\n"), 7, "rules[0].ring.group",
     ["got an int (5)"]),
    (mutate("    dilation_rates: [1, 2]\n", "    dilation_rates: [1, 2]\n    min_seq_len: 1.5\n"), 7,
     "rules[0].min_seq_len", ["got a float (1.5)", "integer >= 0"]),
    ("version: 1\nrules: {match: a, attention: dense}\n", 2, "rules", ["got a mapping", "non-empty list of rules"]),
    ("version: 1\nrules:\n  - dense\n", 3, "rules[0]", ["got a str ('dense')", "mapping"]),
    ("version: 1\ndefaults: [1]\nrules:\n  - {match: a, attention: dense}\n", 2, "defaults", ["got a list"]),
    # empty lists
    (mutate("[2048, 4096]", "[]"), 5, "rules[0].segment_lengths", ["empty list"]),
    ("version: 1\nrules: []\n", 2, "rules", ["empty list", "non-empty list of rules"]),
    # unequal lengths
    (mutate("[1, 2]", "[1, 2, 4]"), 6, "rules[0].dilation_rates",
     ["has 3 entries but segment_lengths (rules[0].segment_lengths) has 2", "one dilation rate per segment length"]),
    # non-positive numbers
    (mutate("[2048, 4096]", "[2048, 0]"), 5, "rules[0].segment_lengths[1]", ["got 0", "integer >= 1"]),
    (mutate("[1, 2]", "[-1, 2]"), 6, "rules[0].dilation_rates[0]", ["got -1"]),
    (mutate("    dilation_rates: [1, 2]\n", "    dilation_rates: [1, 2]\n    min_seq_len: -1\n"), 7,
     "rules[0].min_seq_len", ["got -1", "integer >= 0"]),
    # bad patterns
    (mutate('"a.*"', '"re:a(["'), 3, "rules[0].match", ["bad regular expression"]),
    (mutate('"a.*"', '"re:"'), 3, "rules[0].match", ["empty regular expression"]),
    (mutate('"a.*"', '"a.[0-3"'), 3, "rules[0].match", ["no closing ']'"]),
    (mutate('"a.*"', '""'), 3, "rules[0].match", ["empty pattern"]),
    # versions
    (mutate("version: 1", "version: 2"), 1, "version", ["unsupported version: got an int (2)", "expected 1"]),
    (mutate("version: 1", "version: '1'"), 1, "version", ["unsupported version"]),
    (mutate("version: 1", "version: 1.0"), 1, "version", ["got a float (1.0)"]),
    (mutate("version: 1", "version: true"), 1, "version", ["got a boolean (True)"]),
    (mutate("version: 1\n", "# no version\n"), 2, "version", ["missing", "expected version: 1"]),
    # missing required keys
    ("version: 1\n", 1, "rules", ["missing", "non-empty list of rules"]),
    (mutate('match: "a.*"\n    attention', "attention"), 3, "rules[0].match", ["missing"]),
    (mutate("attention: dilated", "head_split: groups"), 3, "rules[0].attention",
     ["missing", "expected one of: dense, dilated, block_sparse"]),
    (mutate("    dilation_rates: [1, 2]\n", ""), 3, "rules[0].dilation_rates", ["missing (required for attention: dilated)"]),
    ("version: 1\nrules:\n  - match: a\n    attention: block_sparse\n    block_size: 64\n", 3, "rules[0].pattern",
     ["missing (required for attention: block_sparse)"]),
    ("version: 1\nrules:\n  - match: a\n    attention: block_sparse\n    pattern: {kind: local_window, window: 1}\n", 3,
     "rules[0].block_size", ["missing (required for attention: block_sparse)", "integer >= 1"]),
    ("version: 1\nrules:\n  - match: a\n    attention: block_sparse\n    block_size: 64\n    pattern: {window: 1}\n", 6,
     "rules[0].pattern.kind", ["missing", "local_window, dilated, global_local, mask_mod"]),
    ("version: 1\nrules:\n  - match: a\n    attention: block_sparse\n    block_size: 64\n    pattern: {kind: dilated, window: 1}\n",
     6, "rules[0].pattern.stride", ["missing (required for kind: dilated)"]),
    # keys that do not apply to the attention kind / pattern kind
    (mutate("    dilation_rates: [1, 2]\n", "    dilation_rates: [1, 2]\n    block_size: 64\n"), 7, "rules[0].block_size",
     ["applies only to attention: block_sparse", "keys for attention: dilated"]),
    ("version: 1\nrules:\n  - match: a\n    attention: dense\n    head_split: groups\n", 5, "rules[0].head_split",
     ["applies only to attention: dilated"]),
    ("version: 1\nrules:\n  - match: a\n    attention: block_sparse\n    block_size: 64\n"
     "    pattern:\n      kind: local_window\n      window: 1\n      stride: 2\n", 9, "rules[0].pattern.stride",
     ["applies only to kind: dilated", "keys for kind: local_window: kind, window"]),
    ("version: 1\nrules:\n  - match: a\n    attention: block_sparse\n    block_size: 64\n    pattern: {kind: local_window, window: -1}\n",
     6, "rules[0].pattern.window", ["got -1", "integer >= 0"]),
    ("version: 1\nrules:\n  - match: a\n    attention: block_sparse\n    block_size: 0\n    pattern: {kind: local_window, window: 1}\n",
     5, "rules[0].block_size", ["got 0", "integer >= 1"]),
    ("version: 1\nrules:\n  - match: a\n    attention: block_sparse\n    block_size: 8\n    pattern: {kind: global_local, global_blocks: 0, window: 1}\n",
     6, "rules[0].pattern.global_blocks", ["got 0", "integer >= 1"]),
    # defaults that apply to no rule
    ("version: 1\ndefaults:\n  min_seq_len: 8\n  segment_lengths: [8]\nrules:\n  - {match: a, attention: dense}\n", 4,
     "defaults.segment_lengths", ["applies to no rule: no rule has attention: dilated"]),
    ("version: 1\ndefaults:\n  pattern: {kind: local_window, window: 1}\nrules:\n  - {match: a, attention: dense}\n", 3,
     "defaults.pattern", ["applies to no rule: no rule has attention: block_sparse"]),
    # a default value that is wrong is reported at the default
    ("version: 1\ndefaults:\n  segment_lengths: [8, x]\nrules:\n  - {match: a, attention: dense}\n", 3,
     "defaults.segment_lengths[1]", ["got a str ('x')"]),
    ("version: 1\ndefaults:\n  dilation_rates: [1, 2]\nrules:\n  - {match: a, attention: dilated, segment_lengths: [4]}\n",
     3, "defaults.dilation_rates", ["has 2 entries but segment_lengths (rules[0].segment_lengths) has 1"]),
    # mask_mod functions
    ("version: 1\nrules:\n  - match: a\n    attention: block_sparse\n    block_size: 8\n"
     "    pattern: {kind: mask_mod, function: no_such_module_xyz.masks:causal}\n", 6, "rules[0].pattern.function",
     ["cannot import module 'no_such_module_xyz.masks'", "ModuleNotFoundError"]),
    ("version: 1\nrules:\n  - match: a\n    attention: block_sparse\n    block_size: 8\n"
     "    pattern: {kind: mask_mod, function: 'operator.and_'}\n", 6, "rules[0].pattern.function",
     ["got 'operator.and_'", "'package.module:name'"]),
    ("version: 1\nrules:\n  - match: a\n    attention: block_sparse\n    block_size: 8\n"
     "    pattern: {kind: mask_mod, function: 'math:no_such_fn'}\n", 6, "rules[0].pattern.function",
     ["module 'math' has no attribute 'no_such_fn'"]),
    ("version: 1\nrules:\n  - match: a\n    attention: block_sparse\n    block_size: 8\n"
     "    pattern: {kind: mask_mod, function: 'math:pi'}\n", 6, "rules[0].pattern.function", ["not callable"]),
    # values YAML itself cannot build
    (mutate("    dilation_rates: [1, 2]\n", "    dilation_rates: [1, 2]\n    min_seq_len: 2020-13-45\n"), 7,
     "rules[0].min_seq_len", ["cannot read value"]),
    (mutate("version: 1", "version: !!python/name:os.system 1"), 1, "version", ["cannot read value"]),
    # duplicate keys
    (mutate("    dilation_rates: [1, 2]\n", "    dilation_rates: [1, 2]\n    attention: dense\n"), 7,
     "rules[0].attention", ["duplicate key 'attention' (first at line 4)"]),
    (DILATED + "version: 1\n", 7, "version", ["duplicate key 'version' (first at line 1)"]),
    # the stated sliding window (window: W)
    (mutate("    dilation_rates: [1, 2]\n", "    dilation_rates: [1, 2]\n    window: 0\n"), 7, "rules[0].window",
     ["got 0", "the model's sliding window in tokens, an integer >= 1"]),
    (mutate("    dilation_rates: [1, 2]\n", "    dilation_rates: [1, 2]\n    window: 4k\n"), 7, "rules[0].window",
     ["got a str ('4k')"]),
    (mutate("    dilation_rates: [1, 2]\n", "    dilation_rates: [1, 2]\n    windw: 8\n"), 7, "rules[0].windw",
     ["unknown key; did you mean 'window'?"]),
    (mutate("    dilation_rates: [1, 2]\n", "    dilation_rates: [1, 2]\n    ring: {}\n    window: 8\n"), 8,
     "rules[0].window", ["a ring rule with attention: dilated cannot run a sliding window (window: 8)",
                         "expected attention: dense (the window exactly) or block_sparse"]),
    ("version: 1\ndefaults:\n  window: 8\n  ring: {}\nrules:\n  - {match: a, attention: dilated, segment_lengths: [4], "
     "dilation_rates: [1]}\n", 3, "defaults.window", ["a ring rule with attention: dilated cannot run a sliding window"]),
    # recursive alias
    ("version: 1\nrules: &r\n  - *r\n", 2, "rules[0]", ["recursive alias"]),  # line of the anchor
]


@pytest.mark.parametrize("text, line, key, fragments", BAD_FILES)
def test_bad_file(tmp_path: Path, text: str, line: int, key: str, fragments: list[str]) -> None:
    err = file_error(tmp_path, text)
    assert (err.line, err.key) == (line, key), str(err)
    assert str(err).startswith(f"{err.file}:{line}: {key}: "), str(err)
    for fragment in fragments:
        assert fragment in str(err), str(err)
    assert err.expected and str(err).rstrip().endswith(err.expected)


def test_error_message_layout(tmp_path: Path) -> None:
    err = file_error(tmp_path, mutate("segment_lengths:", "segment_lenghts:"))
    assert err.message == "unknown key; did you mean 'segment_lengths'?"
    assert err.expected == (
        "one of: attention, block_size, dilation_rates, head_split, match, min_seq_len, pattern, ring, segment_lengths, window"
    )
    assert str(err) == f"{err.file}:5: rules[0].segment_lenghts: {err.message} expected {err.expected}"


@pytest.mark.parametrize(
    "text, line, fragment",
    [
        ("version: 1\nrules:\n  - match: [a\n    attention: dense\n", 4, "YAML syntax error"),
        ("version: 1\nrules:\n\t- match: a\n", 3, "YAML syntax error"),
        ("version: 1\nrules: {a: 1\n", 3, "YAML syntax error"),
        ("version: 1\n---\nversion: 1\n", 2, "YAML syntax error"),
        ("version: 1\nrules: *nope\n", 2, "YAML syntax error"),
    ],
)
def test_yaml_syntax_errors(tmp_path: Path, text: str, line: int, fragment: str) -> None:
    err = file_error(tmp_path, text)
    assert err.line == line, str(err)
    assert err.key is None
    assert fragment in str(err) and err.expected == "valid YAML"


def test_non_text_file(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_bytes(b"version: 1\nrules:\n  - match: \xff\xfe\x00x\n")
    err = error_of(path)
    assert err.file == str(path) and err.line == 3 and "not valid text" in str(err)


def test_unprintable_character(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text("version: 1\nrules:\n  - match: a\x07\n")
    err = error_of(path)
    assert err.line == 3 and "cannot read character" in str(err)


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n"])
def test_empty_file(tmp_path: Path, text: str) -> None:
    err = file_error(tmp_path, text)
    assert err.line is None and err.key is None
    assert "empty policy file" in str(err) and "version: 1" in err.expected


@pytest.mark.parametrize("text", ["- version: 1\n", "hello\n", "~\n", "42\n"])
def test_top_level_not_a_mapping(tmp_path: Path, text: str) -> None:
    err = file_error(tmp_path, text)
    assert err.line == 1 and err.key is None
    assert "expected a mapping with keys: defaults, rules, strict, version" in str(err)


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    err = error_of(str(path))
    assert err.file == str(path) and err.line is None and err.key is None
    assert "cannot read policy file" in str(err) and "No such file" in str(err)


def test_directory_is_not_a_file(tmp_path: Path) -> None:
    err = error_of(tmp_path)
    assert err.file == str(tmp_path) and "cannot read policy file" in str(err)


@pytest.mark.parametrize("value", [42, None, ["version", 1], 1.5])
def test_wrong_input_type(value: object) -> None:
    err = error_of(value)
    assert err.file is None and err.line is None
    assert "a path to a YAML policy file, a dict of the same shape, or a Policy" in str(err)


# --------------------------------------------------------------------------
# Errors in dicts
# --------------------------------------------------------------------------

BAD_DICTS = [
    ({"rules": [{"match": "a", "attention": "dense"}]}, "version", "missing"),
    ({"version": 1, "rules": [{"match": "a", "attention": "dense", "min_seq_len": True}]}, "rules[0].min_seq_len",
     "got a boolean (True)"),
    ({"version": 1, "rules": [{"match": "a", "attention": "dense", "ring": {"layuot": "zigzag"}}]}, "rules[0].ring.layuot",
     "did you mean 'layout'?"),
    ({"version": 1, "rules": [{"match": "a", "attention": "blocksparse"}]}, "rules[0].attention",
     "did you mean 'block_sparse'?"),
    ({"version": 1, 3: 4, "rules": [{"match": "a", "attention": "dense"}]}, "3", "unknown key"),
    ({"version": 1, "rules": ({"match": "a", "attention": "dense"}, 7)}, "rules[1]", "got an int (7)"),
    ({"version": 1, "rules": [{"match": "a", "attention": "dilated", "segment_lengths": (4, 8),
                               "dilation_rates": (1, 2.5)}]}, "rules[0].dilation_rates[1]", "got a float (2.5)"),
]


@pytest.mark.parametrize("doc, key, fragment", BAD_DICTS)
def test_bad_dict(doc: dict, key: str, fragment: str) -> None:
    err = error_of(doc)
    assert (err.file, err.line, err.key) == ("<dict>", None, key)
    assert str(err).startswith(f"<dict>: {key}: ") and fragment in str(err)


def test_tuple_lists_in_dicts_are_fine() -> None:
    policy = load_policy({"version": 1, "rules": ({"match": "a", "attention": "dilated", "segment_lengths": (4, 8),
                                                   "dilation_rates": (1, 2)},)})
    assert policy.rules[0].dilated == DilatedSpec((4, 8), (1, 2))


# --------------------------------------------------------------------------
# The error object
# --------------------------------------------------------------------------


def test_policy_error_is_a_value_error_and_pickles() -> None:
    err = PolicyError("got 0", "p.yaml", 3, "rules[0].block_size", "an integer >= 1")
    assert isinstance(err, ValueError)
    assert str(err) == "p.yaml:3: rules[0].block_size: got 0; expected an integer >= 1"
    copy = pickle.loads(pickle.dumps(err))
    assert (copy.file, copy.line, copy.key, copy.expected, copy.message, str(copy)) == (
        err.file, err.line, err.key, err.expected, err.message, str(err))


def test_policy_error_without_line_or_key() -> None:
    assert str(PolicyError("empty policy file", "p.yaml")) == "p.yaml: empty policy file"
    assert str(PolicyError("bad", None, None, "version")) == "version: bad"


def test_rule_with_bad_pattern_raises_policy_error() -> None:
    with pytest.raises(PolicyError, match="bad regular expression"):
        Rule(match="re:(", attention="dense")


def test_policy_type_is_exported() -> None:
    assert isinstance(load_policy(SPEC_EXAMPLE_DICT), Policy)


def test_deeply_nested_and_alias_bombs_are_policy_errors(tmp_path: Path) -> None:
    err = file_error(tmp_path, "[" * 5000 + "]" * 5000)
    assert "nested too deeply" in str(err)
    lines = ["a: &a [x, x, x, x, x, x, x, x, x]"]
    for prev, name in zip("abcdefgh", "bcdefghi"):
        lines.append(f"{name}: &{name} [" + ", ".join([f"*{prev}"] * 9) + "]")
    err = file_error(tmp_path, "\n".join(lines) + "\n")
    assert "document too large" in str(err)


def test_non_scalar_mapping_key(tmp_path: Path) -> None:
    err = file_error(tmp_path, "version: 1\nrules:\n  - ? [a, b]\n    : 1\n")
    assert (err.line, err.key) == (3, "rules[0]") and "mapping key must be a plain scalar" in str(err)
