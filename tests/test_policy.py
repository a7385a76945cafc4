"""Tests of the policy file: valid documents load into rules with their defaults, and the
digest follows the content, not its spelling. Errors: tests/test_policy_errors.py; what `match`
names: tests/test_policy_matching.py."""

from __future__ import annotations

import dataclasses
import pickle
from pathlib import Path

import pytest

from dilated_compile.policy import (
    BlockPattern,
    BlockSparseSpec,
    DilatedSpec,
    RingSpec,
    Rule,
    load_policy,
)

from .policy_common import SPEC_EXAMPLE, SPEC_EXAMPLE_DICT, write


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
