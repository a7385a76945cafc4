"""Checking a policy document into a :class:`Policy`.

:func:`load_policy` takes a YAML path, a dict of the same shape or a
:class:`Policy`. Anything wrong is a :class:`PolicyError` naming the file,
the line, the dotted key (``rules[0].segment_lengths``) and what was
expected, with a "did you mean" for misspelt keys and values; no other
exception type escapes it.

Each attention kind is one entry of :data:`STRATEGIES`: the keys a rule of
that kind takes, the values of the optional ones when absent, and the
validator that builds its settings. Each key's value is checked by one entry of
:data:`KEY_CHECKS`.

Choices made where the schema is silent:

* An explicit ``null`` is a type error, except for ``defaults`` (no
  defaults) and ``ring.group`` (the world group). ``ring:`` with no value is
  therefore an error that points at ``ring: {}``.
* ``ring: false`` declares a rule's sites shard-local on purpose (no ring;
  :attr:`Rule.local`); a rule's own ``ring: false`` overrides a ring in
  ``defaults``. ``ring: true`` is an error pointing at ``ring: {}``.
* ``"re:"`` with nothing after it is an error (use ``"**"`` to match
  everything).
* ``window: W`` states the sliding window of the model's attention in the
  sites a rule matches (key j allowed for query i when i - W < j <= i, or
  |i - j| < W without causal masking; global positions). Every attention kind
  takes it; with ``attention: dilated`` and a ring it is an error (dilated
  attention does not keep a window, and a ring must run the window across
  ranks). :mod:`dilated_compile.passes.stated_window` checks it against each
  site's mask.
* :meth:`Policy.rule_for` looks at the module path only; ``min_seq_len`` is
  left to the caller, which knows the key length.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from .errors import PolicyError, Where, did_you_mean, one_of, show
from .loader import read_file
from .matching import PatternSyntaxError, compile_match
from .model import Policy, Rule
from .specs import (
    ATTENTION_KINDS,
    HEAD_SPLITS,
    RING_LAYOUTS,
    SCHEMA_VERSION,
    BlockSparseSpec,
    DilatedSpec,
    RingSpec,
)
from .patterns import PATTERN_EXPECTED, check_pattern
from .values import check_bool, check_choice, check_int, check_keys, check_mapping, check_positive_ints, is_int, missing

__all__ = ["Strategy", "RuleValues", "STRATEGIES", "KEY_CHECKS", "load_policy", "build_policy"]

DICT_SOURCE = "<dict>"
_TOP_KEYS = ("version", "strict", "defaults", "rules")
_RING_KEYS = ("group", "layout")
_MATCH_EXPECTED = "a glob like 'transformer.h.*.attn' or 're:<regular expression>'"
_INTS_EXPECTED = "a non-empty list of positive integers"
_ATTENTION_HINT = "; ring is its own key: e.g. 'attention: dense' with 'ring: {}'?"
_WINDOW_EXPECTED = "the model's sliding window in tokens, an integer >= 1 (e.g. window: 4096)"

# An entry of a rule after merging defaults: (value, dotted key it came from).
Entries = dict[str, tuple[Any, str]]


# --------------------------------------------------------------------------
# Checks of each rule key's value
# --------------------------------------------------------------------------


def _check_match(where: Where, value: Any, key: str) -> str:
    """A rule's `match`: a non-empty glob or 're:' regex that compiles."""
    if not isinstance(value, str):
        raise where.error(key, f"got {show(value)}", _MATCH_EXPECTED)
    if not value:
        raise where.error(key, "empty pattern", _MATCH_EXPECTED)
    try:
        compile_match(value)
    except PatternSyntaxError as exc:
        raise where.error(key, str(exc), _MATCH_EXPECTED) from None
    return value


def _check_attention(where: Where, value: Any, key: str) -> str:
    """dense | dilated | block_sparse."""
    hint = _ATTENTION_HINT if isinstance(value, str) and value == "ring" else ""
    return check_choice(where, value, key, ATTENTION_KINDS, hint)


_RING_EXPECTED = (
    "a mapping like {layout: zigzag} (use 'ring: {}' for ring with default settings), "
    "or false (attention within each rank's shard, on purpose)"
)


def _check_ring(where: Where, value: Any, key: str) -> RingSpec | bool:
    """A ring mapping (``{}`` is ring with defaults), or ``false``: no ring, on purpose."""
    if value is False:
        return False
    if value is True:
        raise where.error(key, f"got {show(value)}; a ring is written 'ring: {{}}' or with its settings", _RING_EXPECTED)
    if isinstance(value, str) and (value.strip().lower() in ("off", "no", "none", "local")
                                   or did_you_mean(value.strip().lower(), ("false",))):
        raise where.error(key, f"got {show(value)}; did you mean false (unquoted)?", _RING_EXPECTED)
    m = check_mapping(where, value, key, _RING_EXPECTED)
    check_keys(where, m, key, _RING_KEYS)
    layout = check_choice(where, m.get("layout", "contiguous"), f"{key}.layout", RING_LAYOUTS)
    group = m.get("group")
    if group is not None and (not isinstance(group, str) or not group):
        expected = "a non-empty process group name given to register_group, or null"
        raise where.error(f"{key}.group", f"got {show(group)}", expected)
    return RingSpec(layout=layout, group=group)


def _check_window(where: Where, value: Any, key: str) -> int:
    """The model's sliding window: an int >= 1."""
    if not is_int(value) or value < 1:
        raise where.error(key, f"got {value if is_int(value) else show(value)}", _WINDOW_EXPECTED)
    return int(value)


# key -> (check of its value, what is expected when a kind requires it and it is absent)
KEY_CHECKS: dict[str, tuple[Callable[[Where, Any, str], Any], str]] = {
    "match": (_check_match, "a glob or 're:<regular expression>' naming module paths"),
    "attention": (_check_attention, one_of(ATTENTION_KINDS)),
    "min_seq_len": (lambda where, value, key: check_int(where, value, key, 0), "an integer >= 0"),
    "ring": (_check_ring, "a mapping like {layout: zigzag}, or false"),
    "segment_lengths": (check_positive_ints, _INTS_EXPECTED),
    "dilation_rates": (check_positive_ints, _INTS_EXPECTED),
    "head_split": (lambda where, value, key: check_choice(where, value, key, HEAD_SPLITS), one_of(HEAD_SPLITS)),
    "block_size": (lambda where, value, key: check_int(where, value, key, 1), "an integer >= 1"),
    "pattern": (check_pattern, PATTERN_EXPECTED),
    "window": (_check_window, _WINDOW_EXPECTED),
}


def _checked(where: Where, entries: Entries, key: str) -> Any:
    """The checked value of entry `key`."""
    value, path = entries[key]
    return KEY_CHECKS[key][0](where, value, path)


# --------------------------------------------------------------------------
# One entry per attention kind
# --------------------------------------------------------------------------


class RuleValues:
    """The keys of one rule (defaults merged under it), each checked when first asked for."""

    def __init__(self, where: Where, entries: Entries, rule_key: str, kind: str) -> None:
        self.where = where
        self.entries = entries
        self.rule_key = rule_key
        self.kind = kind

    def __getitem__(self, key: str) -> Any:
        """The checked value of `key`, its default, or a "missing" error."""
        if key in self.entries:
            return _checked(self.where, self.entries, key)
        defaults = STRATEGIES[self.kind].defaults
        if key in defaults:
            return defaults[key]
        why = f" (required for attention: {self.kind})"
        raise missing(self.where, f"{self.rule_key}.{key}", why, KEY_CHECKS[key][1])

    def key_of(self, key: str) -> str:
        """The dotted key `key`'s value came from (``defaults.x`` when merged from defaults)."""
        return self.entries[key][1]


@dataclass(frozen=True)
class Strategy:
    """How a rule of one attention kind is checked.

    ``keys``: the keys it takes besides the common ones (``match``,
    ``attention``, ``min_seq_len``, ``ring``, ``window``); ``defaults``: values of the
    optional ones, used when absent (a key in ``keys`` without a default is
    required); ``validate``: the :class:`Rule` fields it sets, from the rule's
    values (it asks for each key in the order its errors should come).
    """

    keys: tuple[str, ...]
    defaults: Mapping[str, Any]
    validate: Callable[[RuleValues], dict[str, Any]]


def _dense(values: RuleValues) -> dict[str, Any]:
    """Dense attention has no settings."""
    return {}


def _dilated(values: RuleValues) -> dict[str, Any]:
    """The DilatedSpec; one dilation rate per segment length."""
    segments, rates = values["segment_lengths"], values["dilation_rates"]
    if len(segments) != len(rates):
        raise values.where.error(
            values.key_of("dilation_rates"),
            f"has {len(rates)} entries but segment_lengths ({values.key_of('segment_lengths')}) has {len(segments)}",
            "one dilation rate per segment length",
        )
    spec = DilatedSpec(segment_lengths=segments, dilation_rates=rates, head_split=values["head_split"])
    return {"dilated": spec}


def _block_sparse(values: RuleValues) -> dict[str, Any]:
    """The BlockSparseSpec."""
    return {"block_sparse": BlockSparseSpec(block_size=values["block_size"], pattern=values["pattern"])}


STRATEGIES: dict[str, Strategy] = {
    "dense": Strategy(keys=(), defaults={}, validate=_dense),
    "dilated": Strategy(
        keys=("segment_lengths", "dilation_rates", "head_split"), defaults={"head_split": "groups"}, validate=_dilated
    ),
    "block_sparse": Strategy(keys=("block_size", "pattern"), defaults={}, validate=_block_sparse),
}
if tuple(STRATEGIES) != ATTENTION_KINDS:
    raise RuntimeError(f"STRATEGIES {tuple(STRATEGIES)} and ATTENTION_KINDS {ATTENTION_KINDS} differ")

_COMMON_RULE_KEYS = ("match", "attention", "min_seq_len", "ring", "window")
_KIND_KEYS = {kind: _COMMON_RULE_KEYS + strategy.keys for kind, strategy in STRATEGIES.items()}
_RULE_KEYS = tuple(sorted({k for keys in _KIND_KEYS.values() for k in keys}))
_DEFAULT_KEYS = tuple(k for k in _RULE_KEYS if k != "match")


def _kinds_taking(key: str) -> list[str]:
    """The attention kinds whose rules take `key`."""
    return [kind for kind, keys in _KIND_KEYS.items() if key in keys]


# --------------------------------------------------------------------------
# Rules and the document
# --------------------------------------------------------------------------


def _check_kind_keys(where: Where, rule: Mapping[Any, Any], rule_key: str, kind: str) -> None:
    """Every key the rule sets itself applies to its attention kind."""
    allowed = _KIND_KEYS[kind]
    for key in rule:
        if key not in allowed:
            raise where.error(
                f"{rule_key}.{key}", f"applies only to attention: {', '.join(_kinds_taking(key))}",
                f"keys for attention: {kind}: " + ", ".join(sorted(allowed)),
            )


def _rule(where: Where, value: Any, index: int, defaults: Entries) -> Rule:
    """One checked rule, defaults merged under it."""
    rule_key = f"rules[{index}]"
    m = check_mapping(where, value, rule_key, "a mapping with at least 'match' and 'attention'")
    check_keys(where, m, rule_key, _RULE_KEYS)
    entries: Entries = {key: (val, f"{rule_key}.{key}") for key, val in m.items()}
    if "match" not in entries:
        raise missing(where, f"{rule_key}.match", "", KEY_CHECKS["match"][1])
    match = _checked(where, entries, "match")
    if "attention" not in entries and "attention" in defaults:
        entries["attention"] = defaults["attention"]
    if "attention" not in entries:
        raise missing(where, f"{rule_key}.attention", "", one_of(ATTENTION_KINDS))
    kind = _checked(where, entries, "attention")
    _check_kind_keys(where, m, rule_key, kind)
    for key, entry in defaults.items():
        if key in _KIND_KEYS[kind]:
            entries.setdefault(key, entry)
    min_seq_len = _checked(where, entries, "min_seq_len") if "min_seq_len" in entries else 0
    settings = STRATEGIES[kind].validate(RuleValues(where, entries, rule_key, kind))
    ring = _checked(where, entries, "ring") if "ring" in entries else None
    window = _checked(where, entries, "window") if "window" in entries else None
    if window is not None and kind == "dilated" and ring:
        raise where.error(
            entries["window"][1],
            f"a ring rule with attention: dilated cannot run a sliding window (window: {window}): "
            "dilated attention does not keep one",
            "attention: dense (the window exactly) or block_sparse (its pattern within the window) "
            "for these sites, or no window",
        )
    return Rule(
        match=match, attention=kind, min_seq_len=min_seq_len, ring=ring or None, local=ring is False,
        window=window, index=index, line=where.line_of(rule_key), **settings,
    )


def _defaults(where: Where, value: Any) -> Entries:
    """The checked ``defaults`` mapping, as entries."""
    if value is None:
        return {}
    m = check_mapping(where, value, "defaults", "a mapping of rule keys")
    for key in m:
        if key == "match":
            raise where.error("defaults.match", "match cannot have a default; every rule sets its own", one_of(_DEFAULT_KEYS))
    check_keys(where, m, "defaults", _DEFAULT_KEYS)
    entries: Entries = {key: (val, f"defaults.{key}") for key, val in m.items()}
    for key in entries:
        _checked(where, entries, key)
    return entries


def _check_defaults_used(where: Where, defaults: Entries, rules: Sequence[Rule]) -> None:
    """Every defaults key is relevant to at least one rule."""
    kinds = {rule.attention for rule in rules}
    for key, (_, path) in defaults.items():
        owners = _kinds_taking(key)
        if not kinds.intersection(owners):
            wanted = " or ".join(f"attention: {k}" for k in owners)
            raise where.error(path, f"applies to no rule: no rule has {wanted}", f"a rule with {wanted}, or no {path}")


def _version(where: Where, root: Mapping[Any, Any]) -> int:
    """The schema version; only 1 exists."""
    expected = f"version: {SCHEMA_VERSION}"
    if "version" not in root:
        raise missing(where, "version", "", expected)
    value = root["version"]
    if not is_int(value) or value != SCHEMA_VERSION:
        raise where.error("version", f"unsupported version: got {show(value)}", f"{SCHEMA_VERSION} (written {expected})")
    return SCHEMA_VERSION


def _rules_list(where: Where, root: Mapping[Any, Any]) -> Sequence[Any]:
    """The raw ``rules`` list, non-empty."""
    expected = "a non-empty list of rules (mappings with 'match' and 'attention')"
    if "rules" not in root:
        raise missing(where, "rules", "", expected)
    value = root["rules"]
    if not isinstance(value, (list, tuple)):
        raise where.error("rules", f"got {show(value)}", expected)
    if not value:
        raise where.error("rules", "empty list", expected)
    return value


def _canonical(version: int, strict: bool, rules: Sequence[Rule]) -> str:
    """Canonical JSON of the checked content (no file, no line numbers)."""
    content = {
        "version": version,
        "strict": strict,
        "rules": [
            {k: v for k, v in dataclasses.asdict(rule).items() if k not in ("index", "line")}
            for rule in rules
        ],
    }
    return json.dumps(content, sort_keys=True, separators=(",", ":"))


def build_policy(value: Any, where: Where) -> Policy:
    """Check a parsed document (`where` knows its file and lines) into a Policy."""
    root = check_mapping(where, value, "", "a mapping with keys: " + ", ".join(sorted(_TOP_KEYS)))
    check_keys(where, root, "", _TOP_KEYS)
    version = _version(where, root)
    strict = check_bool(where, root["strict"], "strict") if "strict" in root else False
    defaults = _defaults(where, root.get("defaults"))
    rules = tuple(_rule(where, raw, i, defaults) for i, raw in enumerate(_rules_list(where, root)))
    _check_defaults_used(where, defaults, rules)
    digest = hashlib.sha256(_canonical(version, strict, rules).encode("utf-8")).hexdigest()
    return Policy(version=version, strict=strict, rules=rules, source=where.file or DICT_SOURCE, digest=digest)


def load_policy(policy: "str | os.PathLike[str] | Mapping[str, Any] | Policy") -> Policy:
    """Load and check a policy: a YAML file path, a dict of the same shape, or a Policy (returned as is).

    Raises PolicyError, and no other exception, for anything wrong with it.
    """
    if isinstance(policy, Policy):
        return policy
    if isinstance(policy, Mapping):
        return build_policy(policy, Where(DICT_SOURCE))
    if isinstance(policy, (str, bytes, os.PathLike)):
        value, where = read_file(policy)
        return build_policy(value, where)
    raise PolicyError(
        f"got {show(policy)}", None, None, None,
        "a path to a YAML policy file, a dict of the same shape, or a Policy",
    )
