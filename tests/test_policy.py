"""Tests of the policy file: loading, validation errors, matching, digests."""

from __future__ import annotations

import dataclasses
import pickle
import textwrap
from pathlib import Path

import pytest

from dilated_compile.policy import (
    BlockPattern,
    BlockSparseSpec,
    DilatedSpec,
    Policy,
    PolicyError,
    RingSpec,
    Rule,
    load_policy,
)

SPEC_EXAMPLE = r"""version: 1
strict: false                 # true: a targeted site that cannot be rewritten is an error
defaults:                     # merged under every rule
  min_seq_len: 4096           # rule applies only where the key length is at least this
rules:                        # first match wins
  - match: "transformer.h.*.attn"        # glob on the dotted module path
    attention: dilated                   # dense | dilated | block_sparse
    segment_lengths: [2048, 4096, 8192]
    dilation_rates: [1, 2, 4]
    head_split: longnet
    ring: {layout: zigzag}               # optional; `group:` names a process group
  - match: "re:^encoder\\.layer\\.[0-3]\\."  # "re:" prefix = regular expression
    attention: block_sparse
    block_size: 128
    pattern: {kind: local_window, window: 2}
"""

SPEC_EXAMPLE_DICT = {
    "version": 1,
    "strict": False,
    "defaults": {"min_seq_len": 4096},
    "rules": [
        {
            "match": "transformer.h.*.attn",
            "attention": "dilated",
            "segment_lengths": [2048, 4096, 8192],
            "dilation_rates": [1, 2, 4],
            "head_split": "longnet",
            "ring": {"layout": "zigzag"},
        },
        {
            "match": "re:^encoder\\.layer\\.[0-3]\\.",
            "attention": "block_sparse",
            "block_size": 128,
            "pattern": {"kind": "local_window", "window": 2},
        },
    ],
}


def write(tmp_path: Path, text: str, name: str = "policy.yaml") -> Path:
    """Write a policy file and return its path."""
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def error_of(policy: object) -> PolicyError:
    """The PolicyError that loading `policy` raises."""
    with pytest.raises(PolicyError) as info:
        load_policy(policy)  # type: ignore[arg-type]
    return info.value


def file_error(tmp_path: Path, text: str) -> PolicyError:
    """The PolicyError for a YAML text, checking that it names the file."""
    path = write(tmp_path, text)
    err = error_of(str(path))
    assert err.file == str(path)
    assert str(err).startswith(str(path))
    return err


# --------------------------------------------------------------------------
# Valid documents
# --------------------------------------------------------------------------


def test_spec_example_loads(tmp_path: Path) -> None:
    path = write(tmp_path, SPEC_EXAMPLE)
    policy = load_policy(str(path))
    assert policy.version == 1 and policy.strict is False
    assert policy.source == str(path)
    assert len(policy.digest) == 64
    first, second = policy.rules
    assert first == Rule(
        match="transformer.h.*.attn",
        attention="dilated",
        min_seq_len=4096,
        dilated=DilatedSpec((2048, 4096, 8192), (1, 2, 4), "longnet"),
        ring=RingSpec(layout="zigzag", group=None),
        index=0,
        line=6,
    )
    assert second == Rule(
        match="re:^encoder\\.layer\\.[0-3]\\.",
        attention="block_sparse",
        min_seq_len=4096,
        block_sparse=BlockSparseSpec(128, BlockPattern(kind="local_window", window=2)),
        index=1,
        line=12,
    )


def test_pathlike_input(tmp_path: Path) -> None:
    path = write(tmp_path, SPEC_EXAMPLE)
    assert load_policy(path).digest == load_policy(str(path)).digest


def test_dict_input_equals_file(tmp_path: Path) -> None:
    from_dict = load_policy(SPEC_EXAMPLE_DICT)
    from_file = load_policy(write(tmp_path, SPEC_EXAMPLE))
    assert from_dict.source == "<dict>"
    assert from_dict.digest == from_file.digest
    assert [r.line for r in from_dict.rules] == [None, None]
    assert [dataclasses.replace(r, line=None) for r in from_file.rules] == list(from_dict.rules)


def test_policy_input_returned_as_is() -> None:
    policy = load_policy(SPEC_EXAMPLE_DICT)
    assert load_policy(policy) is policy


def test_results_are_frozen_and_hashable() -> None:
    policy = load_policy(SPEC_EXAMPLE_DICT)
    with pytest.raises(dataclasses.FrozenInstanceError):
        policy.strict = True  # type: ignore[misc]
    assert hash(policy) == hash(load_policy(SPEC_EXAMPLE_DICT))
    assert pickle.loads(pickle.dumps(policy)) == policy
    assert pickle.loads(pickle.dumps(policy)).rule_for("transformer.h.0.attn") is not None


def test_longnet_rates_are_valid() -> None:
    policy = load_policy({
        "version": 1,
        "rules": [{
            "match": "**",
            "attention": "dilated",
            "segment_lengths": [2048, 4096, 8192, 16384, 32768],
            "dilation_rates": [1, 2, 4, 6, 12],
            "head_split": "longnet",
        }],
    })
    assert policy.rules[0].dilated == DilatedSpec((2048, 4096, 8192, 16384, 32768), (1, 2, 4, 6, 12), "longnet")


def test_minimal_rules_and_field_defaults() -> None:
    policy = load_policy({
        "version": 1,
        "rules": [
            {"match": "a", "attention": "dense"},
            {"match": "b", "attention": "dilated", "segment_lengths": [8], "dilation_rates": [3]},
            {"match": "c", "attention": "dense", "ring": {}},
            {"match": "d", "attention": "dense", "ring": {"group": "tp", "layout": "contiguous"}},
        ],
    })
    dense, dilated, ring_default, ring_group = policy.rules
    assert policy.strict is False
    assert dense.min_seq_len == 0 and dense.dilated is None and dense.block_sparse is None and dense.ring is None
    assert dilated.dilated == DilatedSpec((8,), (3,), "groups")
    assert ring_default.ring == RingSpec("contiguous", None)
    assert ring_group.ring == RingSpec("contiguous", "tp")
    assert [r.index for r in policy.rules] == [0, 1, 2, 3]


@pytest.mark.parametrize(
    "pattern, expected",
    [
        ({"kind": "local_window", "window": 0}, BlockPattern("local_window", window=0)),
        ({"kind": "dilated", "stride": 4, "window": 1}, BlockPattern("dilated", window=1, stride=4)),
        ({"kind": "global_local", "global_blocks": 1, "window": 3}, BlockPattern("global_local", window=3, global_blocks=1)),
        ({"kind": "mask_mod", "function": "operator:and_"}, BlockPattern("mask_mod", function="operator:and_")),
    ],
)
def test_block_patterns(pattern: dict, expected: BlockPattern) -> None:
    policy = load_policy({
        "version": 1,
        "rules": [{"match": "x", "attention": "block_sparse", "block_size": 64, "pattern": pattern}],
    })
    assert policy.rules[0].block_sparse == BlockSparseSpec(64, expected)


def test_mask_mod_from_a_user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pkg = tmp_path / "my_masks_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "masks.py").write_text("def causal(b, h, q, kv):\n    return kv <= q\nclass K:\n    @staticmethod\n    def m(b, h, q, kv):\n        return True\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for function in ("my_masks_pkg.masks:causal", "my_masks_pkg.masks:K.m"):
        policy = load_policy({
            "version": 1,
            "rules": [{"match": "x", "attention": "block_sparse", "block_size": 16,
                       "pattern": {"kind": "mask_mod", "function": function}}],
        })
        assert policy.rules[0].block_sparse.pattern.function == function


def test_defaults_merging() -> None:
    policy = load_policy({
        "version": 1,
        "strict": True,
        "defaults": {
            "attention": "dilated",
            "min_seq_len": 1024,
            "segment_lengths": [64, 128],
            "dilation_rates": [1, 2],
            "head_split": "longnet",
            "block_size": 32,
            "pattern": {"kind": "dilated", "stride": 2, "window": 1},
            "ring": {"layout": "zigzag", "group": "sp"},
        },
        "rules": [
            {"match": "a"},
            {"match": "b", "segment_lengths": [16], "dilation_rates": [4], "min_seq_len": 0, "ring": {}},
            {"match": "c", "attention": "block_sparse", "pattern": {"kind": "local_window", "window": 5}},
            {"match": "d", "attention": "dense"},
        ],
    })
    a, b, c, d = policy.rules
    assert policy.strict is True
    assert a.attention == "dilated" and a.min_seq_len == 1024
    assert a.dilated == DilatedSpec((64, 128), (1, 2), "longnet")
    assert a.ring == RingSpec("zigzag", "sp")
    # the rule's own values win; ring is replaced whole, not merged
    assert b.dilated == DilatedSpec((16,), (4,), "longnet") and b.min_seq_len == 0
    assert b.ring == RingSpec("contiguous", None)
    # pattern is replaced whole, not merged with the default's stride
    assert c.block_sparse == BlockSparseSpec(32, BlockPattern("local_window", window=5))
    assert c.dilated is None
    # dilated and block-sparse defaults do not reach a dense rule
    assert d.dilated is None and d.block_sparse is None and d.min_seq_len == 1024


def test_defaults_null_means_none() -> None:
    policy = load_policy({"version": 1, "defaults": None, "rules": [{"match": "a", "attention": "dense"}]})
    assert policy.rules[0].min_seq_len == 0


def test_anchors_aliases_and_merge_keys(tmp_path: Path) -> None:
    path = write(tmp_path, """\
        version: 1
        defaults:
          segment_lengths: &w [512, 1024]
        rules:
          - &first {match: a, attention: dilated, dilation_rates: [1, 2]}
          - <<: *first
            match: b
            dilation_rates: [2, 4]
          - {match: c, attention: dilated, segment_lengths: *w, dilation_rates: [1, 1]}
    """)
    policy = load_policy(path)
    assert [r.match for r in policy.rules] == ["a", "b", "c"]
    assert [r.dilated.dilation_rates for r in policy.rules] == [(1, 2), (2, 4), (1, 1)]
    assert all(r.dilated.segment_lengths == (512, 1024) for r in policy.rules)
    assert policy.rules[1].line == 6


def test_merge_key_values_fill_only_absent_keys(tmp_path: Path) -> None:
    path = write(tmp_path, """\
        version: 1
        rules:
          - &r {match: a, attention: dense, min_seq_len: 5}
          - <<: *r
            match: b
    """)
    a, b = load_policy(path).rules
    assert (b.match, b.attention, b.min_seq_len) == ("b", "dense", 5)


def test_describe() -> None:
    policy = load_policy(SPEC_EXAMPLE_DICT)
    assert policy.rules[0].describe() == (
        "rules[0] 'transformer.h.*.attn' -> dilated w=[2048,4096,8192] r=[1,2,4] longnet ring=zigzag min_seq_len=4096"
    )
    assert policy.rules[1].describe() == (
        "rules[1] 're:^encoder\\.layer\\.[0-3]\\.' -> block_sparse b=128 local_window(window=2) min_seq_len=4096"
    )
    assert Rule(match="x", attention="dense", ring=RingSpec("zigzag", "tp")).describe() == "rules[0] 'x' -> dense ring=zigzag@tp"


# --------------------------------------------------------------------------
# Matching
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "pattern, path, expected",
    [
        ("transformer.h.*.attn", "transformer.h.3.attn", True),
        ("transformer.h.*.attn", "transformer.h.11.attn", True),
        ("transformer.h.*.attn", "transformer.h.3.attn.c_attn", True),  # ancestor matches
        ("transformer.h.*.attn", "transformer.h.3.mlp", False),
        ("transformer.h.*.attn", "transformer.h.attn", False),  # * is one or more chars
        ("transformer.h.*.attn", "transformer.h.a.b.attn", False),  # * stays within a component
        ("transformer.h.*.attn", "transformer.h", False),
        ("transformer.h.*.attn", "xtransformer.h.3.attn", False),  # whole path
        ("*.attn", "h.attn", True),
        ("*.attn", "a.h.attn", False),
        ("encoder.layer.0", "encoder.layer.0.attention.self", True),
        ("encoder.layer.0", "encoder.layer.0", True),
        ("encoder.layer.0", "encoder.layer.01.attention", False),
        ("encoder.layer.0", "encoder.layer", False),
        ("**", "", True),
        ("**", "anything.at.all", True),
        ("**.attn", "a.b.c.attn", True),
        ("**.attn", "attn", True),
        ("**.attn", "a.b.c.attn_x", False),
        ("a.**.attn", "a.b.c.attn", True),
        ("a.**.attn", "a.attn", True),
        ("a.**.attn", "b.x.attn", False),
        ("a.**", "a", True),
        ("a.**", "a.b.c", True),
        ("a.**", "ab", False),
        ("h.1**", "h.12.x", True),
        ("h.?.attn", "h.3.attn", True),
        ("h.?.attn", "h.11.attn", False),
        ("h.[0-3].attn", "h.2.attn", True),
        ("h.[0-3].attn", "h.7.attn", False),
        ("h.[!0-3].attn", "h.7.attn", True),
        ("h.[!0-3].attn", "h.1.attn", False),
        ("h[.]x", "h.x", False),  # a class never matches a dot
        ("h+x(1)", "h+x(1)", True),  # regex characters in a glob are literal
        ("re:attn$", "transformer.h.3.attn", True),
        ("re:attn$", "transformer.h.3.attn.proj", False),  # '$' restricts to that path
        ("re:^encoder\\.layer\\.[0-3]\\.", "encoder.layer.2.attention.self", True),
        ("re:^encoder\\.layer\\.[0-3]\\.", "encoder.layer.5.attention.self", False),
        ("re:h\\.1", "x.h.12.attn", True),  # re.search: anywhere
        ("re:^$", "", True),
    ],
)
def test_matches(pattern: str, path: str, expected: bool) -> None:
    assert Rule(match=pattern, attention="dense").matches(path) is expected


def test_rule_for_first_match_wins() -> None:
    policy = load_policy({
        "version": 1,
        "rules": [
            {"match": "encoder.layer.0", "attention": "dense"},
            {"match": "encoder.**", "attention": "dilated", "segment_lengths": [4], "dilation_rates": [1]},
            {"match": "re:.", "attention": "dense", "min_seq_len": 7},
        ],
    })
    assert policy.rule_for("encoder.layer.0.attention.self").index == 0
    assert policy.rule_for("encoder.layer.1.attention.self").index == 1
    assert policy.rule_for("decoder.layer.1").index == 2
    assert policy.rule_for("") is None


def test_rule_for_none_when_nothing_matches() -> None:
    policy = load_policy({"version": 1, "rules": [{"match": "a.b", "attention": "dense"}]})
    assert policy.rule_for("a") is None
    assert policy.rule_for("c.a.b") is None


# --------------------------------------------------------------------------
# Digest
# --------------------------------------------------------------------------


def test_digest_equal_for_equal_content(tmp_path: Path) -> None:
    reordered = write(tmp_path, """\
        # same content: other key order, other spelling, comments
        rules:
          - head_split: longnet
            ring:
              layout: zigzag
            dilation_rates:
              - 1
              - 2
              - 4
            segment_lengths: [2048, 4096, 8192]
            attention: dilated
            match: transformer.h.*.attn
            min_seq_len: 4096
          - pattern: {window: 2, kind: local_window}
            block_size: 128
            attention: block_sparse
            match: 're:^encoder\\.layer\\.[0-3]\\.'
            min_seq_len: 4096
        version: 1
    """, "b.yaml")
    assert load_policy(reordered).digest == load_policy(SPEC_EXAMPLE_DICT).digest
    assert load_policy(write(tmp_path, SPEC_EXAMPLE)).digest == load_policy(SPEC_EXAMPLE_DICT).digest


@pytest.mark.parametrize(
    "change",
    [
        lambda d: d.update(strict=True),
        lambda d: d["defaults"].update(min_seq_len=4097),
        lambda d: d["rules"][0].update(head_split="groups"),
        lambda d: d["rules"][0].update(dilation_rates=[1, 2, 8]),
        lambda d: d["rules"][0].update(ring={"layout": "zigzag", "group": "g"}),
        lambda d: d["rules"][0].pop("ring"),
        lambda d: d["rules"][1].update(block_size=64),
        lambda d: d["rules"][1]["pattern"].update(window=3),
        lambda d: d["rules"][1].update(match="re:^encoder"),
        lambda d: d["rules"].reverse(),
    ],
)
def test_digest_changes_with_content(change) -> None:
    import copy

    doc = copy.deepcopy(SPEC_EXAMPLE_DICT)
    change(doc)
    assert load_policy(doc).digest != load_policy(SPEC_EXAMPLE_DICT).digest


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
        "one of: attention, block_size, dilation_rates, head_split, match, min_seq_len, pattern, ring, segment_lengths"
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
