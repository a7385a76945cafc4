"""The policy as data: rules and the policy (the per-strategy settings are in `specs`).

Frozen dataclasses, built by the validator from a policy file or dict and
read by the passes and the lowering. Nothing here reads YAML or checks a
user's document; a :class:`Rule` only compiles its ``match`` (see
:mod:`.matching` for what a pattern matches).
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import PolicyError, show
from .matching import ModulePattern, PatternSyntaxError, compile_match, first_match
from .specs import BlockSparseSpec, DilatedSpec, RingSpec

__all__ = ["Rule", "Policy"]

_MATCH_EXPECTED = "a glob or 're:<regex>'"


@dataclass(frozen=True)
class Rule:
    """One entry of ``rules``: which sites it targets and what they become.

    ``match`` is kept as written; :mod:`dilated_compile.policy.matching` says
    what it matches (globs on dotted module paths and their ancestors, ``*``
    and ``**`` also the root module ``''``, or ``re:`` regular expressions
    applied with :func:`re.search`).
    """

    match: str
    attention: str  # "dense" | "dilated" | "block_sparse"
    min_seq_len: int = 0
    dilated: DilatedSpec | None = None
    block_sparse: BlockSparseSpec | None = None
    ring: RingSpec | None = None
    local: bool = False  # `ring: false`: under a sharded sequence the site attends within its shard, on purpose
    # `window: W`: the model's sliding window at the matched sites (tokens of the global
    # sequence); each site's mask must agree with it (passes/stated_window.py)
    window: int | None = None
    index: int = 0
    line: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.match, str):
            raise PolicyError(f"got {show(self.match)}", key="match", expected=_MATCH_EXPECTED)
        try:
            compiled = compile_match(self.match)
        except PatternSyntaxError as exc:
            raise PolicyError(str(exc), key="match", expected=_MATCH_EXPECTED) from None
        object.__setattr__(self, "_compiled", compiled)

    @property
    def compiled_match(self) -> ModulePattern:
        """The compiled ``match``."""
        return self._compiled  # type: ignore[attr-defined]

    def matches(self, module_path: str) -> bool:
        """Whether this rule targets a site owned by the module at `module_path`."""
        return self.compiled_match.matches(module_path)

    def describe(self) -> str:
        """One line, e.g. ``rules[0] 'transformer.h.*.attn' -> dilated w=[2048,4096] r=[1,2] longnet``."""
        text = f"rules[{self.index}] '{self.match}' -> {self.attention}"
        if self.dilated is not None:
            text += " " + self.dilated.describe()
        if self.block_sparse is not None:
            text += " " + self.block_sparse.describe()
        if self.ring is not None:
            text += " " + self.ring.describe()
        if self.local:
            text += " ring=false"
        if self.window is not None:
            text += f" window={self.window}"
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
        return first_match(self.rules, module_path)
