"""Attention that a sharded sequence leaves within one rank's shard.

When a rule of the policy runs a ring over several ranks, every rank runs the
model on its shard of the sequence. An attention site of the same model that
no ring covers (no rule matches it, its rule has no ``ring:``, the rule's
``min_seq_len`` is not met, or the site was left for a reason) then attends
within the rank's shard only. Such a site is found here, per compiled graph;
the backend warns once per module per model (`ShardLocalWarning`), or raises
under ``strict: true``.

Not such a site: one whose rule says ``ring: false`` (shard-local on purpose),
one that runs as a ring over several ranks, and cross-attention (query length
different from key length: its keys are not the sharded sequence). World size
1, or no process group: nothing is sharded, nothing is found.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..policy.model import Policy, Rule
from ..sharding import ring_info
from .decide import Decision


class ShardLocalWarning(UserWarning):
    """Under a ring over several ranks, an attention site that no ring covers attends
    within each rank's shard only."""


@dataclass(frozen=True)
class Sharding:
    """The ring of a policy that shards the sequence: its rule and world size."""

    rule: Rule
    world_size: int
    policy: str  # the policy's source

    def describe(self) -> str:
        rule = self.rule
        group = f" ({rule.ring.group})" if rule.ring.group else ""
        return (f"policy {self.policy} shards the sequence over {self.world_size} ranks{group} "
                f"(rules[{rule.index}] '{rule.match}' has a ring)")


@dataclass(frozen=True)
class ShardLocalSite:
    """A site that attends within each rank's shard without being declared so."""

    module: str  # dotted module path of the site ("" = root)
    form: str  # how the attention was written ("sdpa", ...)
    why: str  # why no ring covers it
    sharding: Sharding
    ringless_rule: int | None = None  # index of the site's rule when that rule has no `ring:`

    def message(self, module: str | None = None) -> str:
        """What the user is told, for this site or for `module`, one that runs the same
        compiled code."""
        path = self.module if module is None else module
        text = (f"attention in {path or '<root>'} ({self.form}) attends within each rank's shard "
                f"only: {self.sharding.describe()}, and {self.why}. ")
        if self.ringless_rule is not None:
            i = self.ringless_rule
            return text + (f"Give rules[{i}] a `ring:` to attend over the whole sequence, or, if "
                           f"attending within the shard is meant, add `ring: false` to rules[{i}], "
                           "which silences this.")
        match = path.replace("*", "[*]").replace("?", "[?]") if path else "re:^$"
        return text + (
            "Give it a ring rule to attend over the whole sequence, or, if attending within the "
            f'shard is meant, declare it with a rule {{match: "{match}", attention: dense, '
            "ring: false} before the others, which silences this."
        )


def sharding_of(policy: Policy) -> Sharding | None:
    """The first ring rule of `policy` that spans several ranks here; None when nothing is
    sharded (no ring rule, world size 1, no process group, or a group this rank cannot
    use: its rule raises where it matches a site)."""
    for rule in policy.rules:
        if rule.ring is None:
            continue
        try:
            world = ring_info(rule.ring.group).world_size
        except (ValueError, TypeError):
            continue
        if world > 1:
            return Sharding(rule, world, policy.source)
    return None


def _why(d: Decision) -> str | None:
    """Why no ring covers the site, or None when one does (or it is local on purpose,
    or cross-attention)."""
    rule, site = d.rule, d.site
    if rule is not None and rule.local:
        return None
    if d.status == "rewritten" and d.ring is not None and d.ring.world_size > 1:
        return None
    q, k = site.query_len, site.key_len
    if isinstance(q, int) and isinstance(k, int) and q != k:
        return None
    if rule is None:
        return "no rule matches it"
    if d.status == "left" and not d.targeted:
        return f"it was left: {d.reason}"
    if d.status == "left":
        return f"rules[{rule.index}] '{rule.match}' targets it but it was left: {d.reason}"
    if rule.ring is None:
        return f"rules[{rule.index}] '{rule.match}' has no ring"
    return f"the ring of rules[{rule.index}] '{rule.match}' spans one rank"


def shard_local_sites(decisions: list[Decision], policy: Policy) -> list[tuple[Decision, ShardLocalSite]]:
    """The sites of one graph that attend within each rank's shard by accident; empty when
    the policy shards nothing."""
    sharding = sharding_of(policy)
    if sharding is None:
        return []
    found = []
    for d in decisions:
        why = _why(d)
        if why is not None:
            ringless = d.rule.index if d.rule is not None and d.rule.ring is None else None
            found.append((d, ShardLocalSite(d.site.module, d.site.form, why, sharding, ringless)))
    return found


def one_per_module(sites: list[ShardLocalSite]) -> list[ShardLocalSite]:
    """The first of `sites` in each module."""
    seen: dict[str, ShardLocalSite] = {}
    for s in sites:
        seen.setdefault(s.module, s)
    return list(seen.values())
