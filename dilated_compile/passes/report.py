"""Reports of what the pass did (docs/spec.md, "Seeing what it did"): per-site rows, graph diff, counters."""

from __future__ import annotations

import difflib
import logging
from collections import deque
from dataclasses import dataclass, field

import networkx as nx
import torch
import torch.fx as fx
from torch._dynamo.utils import counters

from ..lowering.registry import strategy
from .decide import Decision
from .shard_local import ShardLocalSite
from .sites import graph_modules

log = logging.getLogger("dilated_compile")


@dataclass(frozen=True)
class SiteReport:
    """One attention site and what became of it."""

    module: str  # dotted module path ("" = root)
    form: str  # how it was written ("sdpa", ...)
    attention: str | None  # what it became ("dilated", "dense (unchanged)"), None when left
    status: str  # "rewritten" | "left"
    reason: str | None  # why it was left, else None
    rule: str | None  # the rule that matched, described, or None
    shape: tuple | None  # query shape (batch, heads, seq, head_dim)
    dtype: str | None
    node: str  # FX node name of the original site
    is_causal: bool | None = None  # the site's causal flag, when constant
    dilated: tuple | None = None  # (segment_lengths, dilation_rates, head_split) when rewritten so

    @classmethod
    def from_decision(cls, d: Decision, within_shard: bool = False) -> "SiteReport":
        """The row of decision `d`; `within_shard`: the site attends within each rank's shard
        of a sharded sequence without being declared so (said in `attention` or `reason`)."""
        s = d.site
        became, reason = _became(d), d.reason
        if within_shard and became is not None:
            became += f"; {WITHIN_SHARD}"
        elif within_shard:
            reason = f"{reason}; {WITHIN_SHARD}"
        return cls(
            module=s.module,
            form=s.form,
            attention=became,
            status=d.status,
            reason=reason,
            rule=None if d.rule is None else f"rules[{d.rule.index}] '{d.rule.match}'",
            shape=s.q_shape,
            dtype=None if s.dtype is None else str(s.dtype).replace("torch.", ""),
            node=s.node.name,
            is_causal=s.args.get("is_causal") if isinstance(s.args.get("is_causal"), bool) else None,
            dilated=(
                (d.rule.dilated.segment_lengths, d.rule.dilated.dilation_rates, d.rule.dilated.head_split)
                if d.attention == "dilated" or (d.attention == "ring" and d.rule.attention == "dilated")
                else None
            ),
        )


WITHIN_SHARD = "attends within this rank's shard only (no ring)"
DECLARED_LOCAL = "local (declared)"


def _became(d: Decision) -> str | None:
    """What the site became, in words, e.g. ``ring zigzag over 4 ranks, inner dense``."""
    if d.status != "rewritten":
        return None
    ring_op = d.dynamic and d.attention == "ring"  # the ring custom op (world size > 1)
    local_op = d.dynamic and not ring_op  # the inner attention's custom op
    n = d.site.key_len
    if d.ring is not None and isinstance(n, int):
        n *= d.ring.world_size
    if d.attention == "dense (unchanged)":
        text = "dense (unchanged)"
    elif d.window is not None:
        kind, spec = d.inner()
        text = f"{d.rule.attention} in a sliding window W={d.window}, as {kind.describe(spec, n)}"
    else:
        kind = strategy(d.rule.attention)
        text = kind.describe(kind.spec(d.rule), n)
        if d.attention != "ring" and kind.functions.static is None:  # the site stays as it was
            text += " (unchanged)"
        elif d.ring is None and kind.kernel is not None:
            s = d.site
            words = kind.kernel(kind.spec(d.rule), s.q_shape, s.dtype, s.device, s.args.get("is_causal") is True)
            if words:
                text += f"; {words}"
    if local_op:
        text += f"; dynamic length (custom op), dense below min_seq_len {d.rule.min_seq_len}"
    if d.rule.local:
        return f"{text}; {DECLARED_LOCAL}"
    if d.ring is None:
        return text
    if d.ring.world_size == 1:
        return f"{text}; ring: world size 1, runs locally"
    group = d.rule.ring.group or "world"
    text = f"ring {d.rule.ring.layout} over {d.ring.world_size} ranks ({group}), inner {text}"
    if isinstance(d.site.query_len, int) and not ring_op:
        text += f"; keys: {_key_traffic(d)}"
    if ring_op:  # below min_seq_len the op does what the static path's left site does
        text += (
            f"; dynamic length (custom op), unchanged (this rank's shard only) below global "
            f"min_seq_len {d.rule.min_seq_len}"
        )
    return text


def _key_traffic(d: Decision) -> str:
    """How the ring site moves keys (the inner strategy's `key_traffic`), from the decision."""
    kind, spec = d.inner()
    causal = d.site.args.get("is_causal")
    return kind.functions.key_traffic(
        d.site.query_len, d.rule.ring.layout, d.ring.world_size, d.ring.rank, causal is True,
        **kind.ring_parameters(spec),
    )


def _label(node: fx.Node) -> str:
    if node.op == "call_function":
        what = getattr(node.target, "__name__", str(node.target))
    elif node.op == "call_method":
        what = f".{node.target}()"
    else:
        what = node.op
    val = node.meta.get("example_value")
    shape = "x".join(map(str, val.shape)) if isinstance(val, torch.Tensor) else ""
    return "\n".join(x for x in (node.name, what, shape) if x)


def attention_neighbourhood(gm: fx.GraphModule, centres: list[fx.Node], hops: int = 3) -> nx.DiGraph:
    """The nodes within `hops` edges of the attention nodes, as a small networkx graph.

    Node attributes: `label` (name, op, shape) and `attention` (True for the centres).
    """
    full = nx.DiGraph()
    key: dict[fx.Node, str] = {}
    for path, module in graph_modules(gm):
        for node in module.graph.nodes:  # nested graphs' nodes are named "path/name"
            key[node] = f"{path}/{node.name}" if path else node.name
        for node in module.graph.nodes:
            full.add_node(key[node], label=_label(node), attention=False)
            for user in node.users:
                full.add_edge(key[node], key[user])
    centre_keys = [key[c] for c in centres if c in key]
    keep: set[str] = set()
    undirected = full.to_undirected(as_view=True)
    for centre in centre_keys:
        keep |= set(nx.single_source_shortest_path_length(undirected, centre, cutoff=hops))
    sub = full.subgraph(keep).copy()
    for centre in centre_keys:
        sub.nodes[centre]["attention"] = True
    return sub


def graph_code(gm: fx.GraphModule) -> str:
    """The graph as readable Python."""
    return gm.print_readable(print_output=False)


def unified_diff(before: str, after: str, name: str = "graph") -> str:
    lines = difflib.unified_diff(
        before.splitlines(keepends=True),
        after.splitlines(keepends=True),
        fromfile=f"{name} (before)",
        tofile=f"{name} (after dilated_compile)",
    )
    return "".join(lines)


def format_table(sites: list[SiteReport]) -> str:
    """Fixed-width table, one row per site."""
    header = ("module", "form", "shape", "dtype", "rule", "status", "became / reason")
    rows = [header]
    for s in sites:
        rows.append(
            (
                s.module or "<root>",
                s.form,
                "x".join(map(str, s.shape)) if s.shape else "?",
                s.dtype or "?",
                s.rule or "-",
                s.status,
                s.attention if s.status == "rewritten" else s.reason or "",
            )
        )
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(header) - 1)]
    out = []
    for i, r in enumerate(rows):
        cells = [str(c).ljust(w) for c, w in zip(r, widths)] + [str(r[-1])]
        out.append("  ".join(cells).rstrip())
        if i == 0:
            out.append("  ".join("-" * w for w in widths) + "  " + "-" * 15)
    return "\n".join(out)


@dataclass
class GraphReport:
    """What the pass did to one compiled graph."""

    sites: list[SiteReport]
    before: str  # readable code of the graph before the rewrite
    after: str  # and after
    diff: str  # unified diff of the two
    policy: str  # the policy's source (path or '<dict>')
    left_targeted: list[str] = field(default_factory=list)  # sites a rule wanted but left
    drawing_before: nx.DiGraph | None = None  # attention neighbourhood before the rewrite
    drawing_after: nx.DiGraph | None = None  # and after
    unused_rules: dict[int, str] = field(default_factory=dict)  # rule index -> warning
    rings_over_ranks: bool = False  # a site became a ring over several ranks, traced into the graph
    # Inductor settings the backend chose for this graph (the user's own options win), and
    # AOTAutograd's as "functorch.NAME": name -> why
    inductor_settings: dict[str, str] = field(default_factory=dict)
    # modules of the same class that Dynamo runs this graph's compiled code for (the
    # paths their sites have), when the graph is a frame of one module's own method
    also_runs_for: list[str] = field(default_factory=list)
    # sites that attend within each rank's shard without being declared so, one per module
    shard_local: list[ShardLocalSite] = field(default_factory=list)
    # ring sites whose module declares a sliding window that the shard's mask does not show
    # and no rule states (passes/stated_window.py): what the user is told
    unstated_windows: list[str] = field(default_factory=list)

    @property
    def warnings(self) -> list[str]:
        """Targeted sites left, sites attending within each rank's shard by accident, and ring
        sites whose module's sliding window no rule states. (A rule without a site in this
        graph may have sites in another graph of the model: `Report.warnings` and the
        once-per-model check say so.)"""
        return list(self.left_targeted) + [s.message() for s in self.shard_local] + list(self.unstated_windows)

    def __str__(self) -> str:
        return format_table(self.sites) + _settings_lines(self.inductor_settings)


def _settings_lines(settings: dict[str, str]) -> str:
    """One line per setting: ``inductor: NAME (why)``, or ``functorch: NAME (why)`` for names
    given as ``functorch.NAME`` (AOTAutograd's config)."""
    lines = []
    for name, why in settings.items():
        where, _, short = name.rpartition(".")
        lines.append(f"\n{where or 'inductor'}: {short} ({why})")
    return "".join(lines)


@dataclass
class Report:
    """Reports of every graph of one model (what `explain` returns)."""

    graphs: list[GraphReport]

    @property
    def sites(self) -> list[SiteReport]:
        return [s for g in self.graphs for s in g.sites]

    @property
    def diff(self) -> str:
        return "\n".join(g.diff for g in self.graphs if g.diff)

    @property
    def warnings(self) -> list[str]:
        """Targeted sites left, sites attending within each rank's shard by accident, and
        rules that match no site in any graph."""
        left = [w for g in self.graphs for w in g.warnings]
        if not self.graphs:
            return left
        unused = set.intersection(*(set(g.unused_rules) for g in self.graphs))
        return left + [self.graphs[0].unused_rules[i] for i in sorted(unused)]

    def __str__(self) -> str:
        text = format_table(self.sites)
        settings = {k: v for g in self.graphs for k, v in g.inductor_settings.items()}
        text += _settings_lines(settings)
        if self.warnings:
            text += "\n" + "\n".join(f"warning: {w}" for w in self.warnings)
        return text


_RECENT: deque[GraphReport] = deque(maxlen=64)


def record(report: GraphReport) -> None:
    """Count the sites, log the table and keep the report for `reports()`."""
    for s in report.sites:
        counters["dilated"][s.status] += 1
    _RECENT.append(report)
    log.info("dilated_compile sites (policy %s):\n%s", report.policy, report)
    for w in report.left_targeted:
        log.warning("%s", w)
    if report.also_runs_for:
        log.info("the same compiled code also runs for: %s", ", ".join(report.also_runs_for))


def reports() -> list[GraphReport]:
    """Reports of the graphs compiled with backend='dilated' in this process (last 64)."""
    return list(_RECENT)


def clear_reports() -> None:
    _RECENT.clear()
