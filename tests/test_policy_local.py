"""`ring: false`: a rule's sites attend within each rank's shard on purpose.

Under a ring over several ranks, attention that no ring covers attends within
each rank's shard; the backend warns (`ShardLocalWarning`) unless a rule
declares it with `ring: false`, and raises under `strict: true`. Those cases
run on real process groups in `tests/ring_shard_local_cases.py` (launched by
`tests/ring_worker.py`); here: the policy key, its errors, and that nothing is
said where nothing is sharded.
"""

from __future__ import annotations

import textwrap
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dilated_compile import ShardLocalWarning, explain
from dilated_compile.policy import PolicyError, RingSpec, load_policy
from dilated_compile.sharding import ring_info


def _doc(ring) -> dict:
    return {"version": 1, "rules": [{"match": "a", "attention": "dense", "ring": ring}]}


def test_ring_false_declares_the_rule_local() -> None:
    rule = load_policy(_doc(False)).rules[0]
    assert rule.local and rule.ring is None
    assert rule.describe() == "rules[0] 'a' -> dense ring=false"
    ringed = load_policy(_doc({})).rules[0]
    assert not ringed.local and ringed.ring == RingSpec()


def test_ring_false_overrides_a_ring_in_defaults() -> None:
    policy = load_policy({
        "version": 1,
        "defaults": {"ring": {"layout": "zigzag"}},
        "rules": [{"match": "a", "attention": "dense", "ring": False},
                  {"match": "b", "attention": "dilated", "segment_lengths": [8], "dilation_rates": [1]}],
    })
    a, b = policy.rules
    assert a.local and a.ring is None
    assert not b.local and b.ring == RingSpec("zigzag")


def test_ring_false_changes_the_digest() -> None:
    no_ring = {"version": 1, "rules": [{"match": "a", "attention": "dense"}]}
    assert load_policy(_doc(False)).digest != load_policy(no_ring).digest


@pytest.mark.parametrize(
    "value,fragments",
    [
        ("true", ["got a boolean (True)", "'ring: {}'", "or false"]),
        ("'false'", ["got a str ('false')", "did you mean false (unquoted)?"]),
        ("flase", ["got a str ('flase')", "did you mean false (unquoted)?"]),
        ("zigzag", ["got a str ('zigzag')", "a mapping like {layout: zigzag}", "or false"]),
        ("{layout: zigzag, local: true}", ["rules[0].ring.local: unknown key", "one of: group, layout"]),
    ],
)
def test_bad_ring_values_name_file_line_and_key(tmp_path: Path, value: str, fragments: list[str]) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(textwrap.dedent(f"""\
        version: 1
        rules:
          - match: "a"
            attention: dense
            ring: {value}
        """))
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    assert info.value.line == 5 and info.value.file == str(path)
    assert str(info.value).startswith(f"{path}:5: rules[0].ring")
    for fragment in fragments:
        assert fragment in str(info.value)


class _Attention(torch.nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


class _TwoAttentions(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.first, self.second, self.third = _Attention(), _Attention(), _Attention()

    def forward(self, q, k, v):
        return self.third(self.second(self.first(q, k, v), k, v), k, v)


def test_nothing_sharded_no_warning_and_declared_sites_reported() -> None:
    """No process group: a ring runs locally, nothing is sharded, so a module no ring
    covers is not warned about, even under strict; `ring: false` shows as declared."""
    assert ring_info().world_size == 1
    policy = {
        "version": 1,
        "strict": True,
        "rules": [{"match": "first", "attention": "dense", "ring": {}},
                  {"match": "second", "attention": "dense", "ring": False}],
    }
    q, k, v = (torch.randn(1, 2, 16, 8) for _ in range(3))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = explain(_TwoAttentions(), q, k, v, policy=policy)
    assert not [w for w in caught if issubclass(w.category, ShardLocalWarning)]
    by_module = {s.module: s for s in report.sites}
    assert by_module["first"].attention == "dense (unchanged); ring: world size 1, runs locally"
    assert by_module["second"].attention == "dense (unchanged); local (declared)"
    assert by_module["third"].status == "left" and "shard" not in by_module["third"].reason
    assert not report.warnings


def test_message_names_the_module_and_how_to_declare_it() -> None:
    """The text a user is told: the module, why, and the rule that declares it local (the
    root module, path '', is matched by 're:^$')."""
    from dilated_compile.passes.shard_local import Sharding, ShardLocalSite

    policy = load_policy({"version": 1, "rules": [{"match": "h.*.attn", "attention": "dense", "ring": {}}]})
    site = ShardLocalSite("", "sdpa", "no rule matches it", Sharding(policy.rules[0], 4, policy.source))
    assert site.message() == (
        "attention in <root> (sdpa) attends within each rank's shard only: policy <dict> shards the "
        "sequence over 4 ranks (rules[0] 'h.*.attn' has a ring), and no rule matches it. Give it a "
        "ring rule to attend over the whole sequence, or, if attending within the shard is meant, "
        'declare it with a rule {match: "re:^$", attention: dense, ring: false} before the others, '
        "which silences this."
    )
    assert 'attention in lm.attn (sdpa)' in site.message("lm.attn")
    assert '{match: "lm.attn", attention: dense, ring: false}' in site.message("lm.attn")
    ringless = ShardLocalSite("h.0.attn", "sdpa", "rules[1] 'h.0.attn' has no ring", site.sharding, 1)
    assert ringless.message().endswith(
        "Give rules[1] a `ring:` to attend over the whole sequence, or, if attending within the shard "
        "is meant, add `ring: false` to rules[1], which silences this."
    )
