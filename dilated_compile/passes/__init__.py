"""Pure FX work: find attention sites, match rules, rewrite, report.

Data flows one way: graph -> sites -> decisions -> rewritten graph (+ report).
"""

from __future__ import annotations

import torch.fx as fx

from ..policy.model import Policy
from ..sharding import check_same_on_all_ranks, spans_ranks
from .decide import Decision, decide
from .report import (
    GraphReport,
    Report,
    SiteReport,
    attention_neighbourhood,
    graph_code,
    record,
    unified_diff,
)
from .rewrite import LOWERED_TARGETS, rewrite
from .shard_local import ShardLocalSite, ShardLocalWarning, one_per_module, shard_local_sites
from .stated_window import UnstatedWindow, WindowWarning, unstated_window
from .forms import find_sites
from .sites import Site, graph_modules


class RewriteError(RuntimeError):
    """A site that a `strict: true` policy targets cannot be rewritten."""


def rules_without_sites(policy: Policy, decisions: list[Decision]) -> dict[int, str]:
    """Warnings for rules that matched no site, by rule index."""
    used = {d.rule.index for d in decisions if d.rule is not None}
    return {
        r.index: f"rules[{r.index}] '{r.match}' matches no attention site"
        for r in policy.rules
        if r.index not in used
    }


def _attention_nodes(gm: fx.GraphModule, decisions: list[Decision]) -> list[fx.Node]:
    """The attention nodes of a rewritten graph: the calls rewritten sites became, and the
    sites left as they were."""
    kept = {(d.site.graph, d.site.node.name) for d in decisions}
    nodes = []
    for path, module in graph_modules(gm):
        for n in module.graph.nodes:
            if (n.op == "call_function" and n.target in LOWERED_TARGETS) or (path, n.name) in kept:
                nodes.append(n)
    return nodes


def check_rings_agree(decisions: list[Decision], policy: Policy) -> None:
    """Raise on every rank unless all ranks of each ring's group compile the same
    policy and the same ring sites (shapes, dtype, what they became).

    One collective per process group, at compile time, before any graph runs:
    a mismatch is an error message, not a hang in the first ring step.
    """
    by_group: dict[str, list] = {}
    for d in decisions:
        if d.ring is not None and d.ring.world_size > 1:
            # symbolic sizes as text (a SymInt is not picklable; the same program names them alike)
            shapes = tuple(None if x is None else tuple(s if type(s) is int else str(s) for s in x)
                           for x in (d.site.q_shape, d.site.k_shape))
            entry = (d.site.module, *shapes, str(d.site.dtype), d.status, d.reason)
            by_group.setdefault(d.rule.ring.group or "", []).append(entry)
    for group, sites in sorted(by_group.items()):
        check_same_on_all_ranks(
            (policy.digest, tuple(sites)), "policy and ring attention sites", group or None
        )


def _sharded(d: Decision) -> bool:
    """Whether the site's rule runs it as a ring over several ranks (its input is a shard)."""
    return d.rule is not None and d.rule.ring is not None and spans_ranks(d.rule.ring.group)


def check_left_sites(decisions: list[Decision], policy: Policy) -> None:
    """Raise RewriteError for targeted sites that are left, when leaving them is not allowed.

    Under `strict: true` every such site is an error. A site that a ring rule over
    several ranks targets is an error whatever `strict` says: left as it was, it would
    attend within its rank's shard only. The ranks agree on the decisions
    (`check_rings_agree` ran first), so every rank raises.
    """
    failed = [d for d in decisions if d.targeted and d.status == "left" and (policy.strict or _sharded(d))]
    if not failed:
        return
    lines = "\n".join(f"  {d.site.module or '<root>'} ({d.site.node.name}): {d.reason}" for d in failed)
    if not policy.strict:
        raise RewriteError(
            f"policy {policy.source}: ring rules target these attention sites, which cannot be "
            f"rewritten:\n{lines}\nLeft as they are they would attend within each rank's shard "
            "only. Change the model, or exclude these modules from the ring rule."
        )
    raise RewriteError(
        f"policy {policy.source} is strict and these attention sites cannot be "
        f"rewritten:\n{lines}\nChange the model, or set `strict: false` to leave them "
        "as they are."
    )


def _raise_if_strict(policy: Policy, what: str, found: list) -> None:
    """Under `strict: true`, a RewriteError listing `found` (whose messages say what to change)."""
    if policy.strict and found:
        raise RewriteError(f"policy {policy.source} is strict and {what}:\n  "
                           + "\n  ".join(f.message() for f in found))


def check_shard_local(found: list[ShardLocalSite], policy: Policy) -> None:
    """Under `strict: true`, raise RewriteError for sites that attend within each rank's
    shard by accident (the backend warns for them otherwise)."""
    _raise_if_strict(policy, "these attention sites attend within each rank's shard only", found)


def unstated_windows(decisions: list[Decision]) -> list[UnstatedWindow]:
    """Sites rewritten into a ring over several ranks whose module declares a sliding window
    that their mask on the shard does not show and their rule does not state."""
    found = []
    for d in decisions:
        if d.status == "rewritten" and d.attention == "ring":
            unstated = unstated_window(d.site, d.rule)
            if unstated is not None:
                found.append(unstated)
    return found


def check_unstated_windows(found: list[UnstatedWindow], policy: Policy) -> None:
    """Under `strict: true`, raise RewriteError for ring sites whose module's sliding window
    no rule states (the backend warns for them otherwise)."""
    _raise_if_strict(policy, "these ring sites may run without their model's sliding window", found)


def run_passes(gm: fx.GraphModule, policy: Policy) -> tuple[fx.GraphModule, GraphReport]:
    """Rewrite the sites `policy` selects in a copy of `gm`; return it and its report.

    Raises RewriteError when the policy is strict and a targeted site is left, a site
    attends within each rank's shard by accident, or a ring site's module declares a sliding
    window that no rule states.
    """
    decisions = [decide(site, policy) for site in find_sites(gm)]
    check_rings_agree(decisions, policy)
    check_left_sites(decisions, policy)
    shard_local = shard_local_sites(decisions, policy)
    within_shard = {id(d) for d, _ in shard_local}
    shard_local_modules = one_per_module([s for _, s in shard_local])
    check_shard_local(shard_local_modules, policy)
    windows = unstated_windows(decisions)
    check_unstated_windows(windows, policy)
    new = rewrite(gm, decisions)
    before, after = graph_code(gm), graph_code(new)
    left_targeted = [
        f"{d.site.module or '<root>'}: targeted by rules[{d.rule.index}] but left: {d.reason}"
        for d in decisions
        if d.targeted and d.status == "left"
    ]
    report = GraphReport(
        sites=[SiteReport.from_decision(d, within_shard=id(d) in within_shard) for d in decisions],
        before=before,
        after=after,
        diff=unified_diff(before, after),
        policy=policy.source,
        left_targeted=left_targeted,
        drawing_before=attention_neighbourhood(gm, [d.site.node for d in decisions]),
        drawing_after=attention_neighbourhood(new, _attention_nodes(new, decisions)),
        unused_rules=rules_without_sites(policy, decisions),
        shard_local=shard_local_modules,
        unstated_windows=[u.message() for u in windows],
        rings_over_ranks=any(  # traced into this graph (a dynamic ring is one opaque op)
            d.status == "rewritten" and d.ring is not None and d.ring.world_size > 1 and not d.dynamic
            for d in decisions
        ),
    )
    return new, report


__all__ = [
    "Decision",
    "GraphReport",
    "Report",
    "RewriteError",
    "Site",
    "ShardLocalSite",
    "ShardLocalWarning",
    "WindowWarning",
    "SiteReport",
    "decide",
    "find_sites",
    "record",
    "rewrite",
    "run_passes",
]
