"""Rewrite decided sites in a copy of the graph.

Each rewritten site's node is replaced by a call of the lowering function
that computes the attention the rule asks for; the new node keeps the old
node's metadata (stack trace, module stack, example value) so that Inductor,
error messages and reports still point at the user's code.
"""

from __future__ import annotations

import torch.fx as fx

from ..lowering.targets import lowered_functions, ring_functions
from .decide import Decision
from .sites import graph_modules


def copy_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A new GraphModule with copied graphs (its own and nested ones), sharing
    `gm`'s other submodules and attributes."""
    graph = fx.Graph()
    out = graph.graph_copy(gm.graph, {})
    graph.output(out)
    new = fx.GraphModule(gm, graph, class_name=type(gm).__name__)
    new.meta.update(getattr(gm, "meta", {}))
    for name, child in list(new.named_children()):
        if isinstance(child, fx.GraphModule):
            setattr(new, name, copy_graph_module(child))
    return new


def _attention_kwargs(decision: Decision) -> dict:
    """is_causal and scale of the site."""
    args = decision.site.args
    return {"is_causal": args["is_causal"], "scale": args["scale"]}


def _call(graph: fx.Graph, qkv: tuple[fx.Node, ...], decision: Decision) -> fx.Node:
    """The call a rewritten site becomes: its strategy's function (`dynamic`: the custom op,
    which adds no guard on the length and decides min_seq_len per call), or for a ring over
    several ranks the ring's, with the strategy as its inner attention."""
    rule = decision.rule
    inner, spec = decision.inner()
    extra = {"min_seq_len": rule.min_seq_len} if decision.dynamic else {}
    if decision.attention == "ring":
        ring_local, ring_dynamic = ring_functions()
        ring = decision.ring
        kwargs = {
            "world_size": ring.world_size,
            "rank": ring.rank,
            "group_name": ring.group_name,
            "inner": inner.name,
            "layout": rule.ring.layout,
            **_attention_kwargs(decision),
            **inner.ring_parameters(spec),
            **extra,
        }
        return graph.call_function(ring_dynamic if decision.dynamic else ring_local, args=qkv, kwargs=kwargs)
    functions = inner.functions
    target = functions.dynamic if decision.dynamic else functions.static
    args, kwargs = inner.site_arguments(spec)
    return graph.call_function(
        target, args=(*qkv, *args), kwargs={**kwargs, **_attention_kwargs(decision), **extra}
    )


# Every function a rewritten site calls.
LOWERED_TARGETS = frozenset(lowered_functions())


def _rewrites(decision: Decision) -> bool:
    """Whether the decision replaces its site (a dense site outside a ring stays as it was)."""
    if decision.status != "rewritten" or decision.attention == "dense (unchanged)":
        return False
    return decision.attention == "ring" or decision.inner()[0].functions.static is not None


def _expand_kv_heads(graph: fx.Graph, qkv: tuple[fx.Node, ...], decision: Decision):
    """Grouped-query attention (enable_gqa): key/value head j serves query heads
    j*g .. j*g+g-1, so repeat each k/v head g times along the head dimension."""
    q, k, v = qkv
    hq, hk = decision.site.q_shape[1], decision.site.k_shape[1]
    if hq == hk:
        return qkv
    groups = hq // hk
    expanded = []
    for x in (k, v):
        node = graph.call_method("repeat_interleave", (x, groups), {"dim": 1})
        node.meta = {key: val for key, val in x.meta.items() if key != "example_value"}
        expanded.append(node)
    return (q, *expanded)


def _erase_unused(graph: fx.Graph, chain: list[fx.Node]) -> None:
    """Erase the site's own intermediate nodes, and what only they used, once nothing uses them."""
    candidates: set[fx.Node] = set()
    todo = list(chain)
    while todo:
        n = todo.pop()
        if n not in candidates and n.op in ("call_function", "call_method"):
            candidates.add(n)
            todo.extend(n.all_input_nodes)
    for n in reversed(list(graph.nodes)):
        if n in candidates and not n.users and not n.is_impure():
            graph.erase_node(n)


def rewrite(gm: fx.GraphModule, decisions: list[Decision]) -> fx.GraphModule:
    """`gm` with every rewritten site replaced by the attention its rule asks for.

    `gm` must be the graph the decisions' sites were found in; it is not changed.
    """
    new = copy_graph_module(gm)
    replaced: dict[str, dict[str, fx.Node]] = {}  # graph path -> old node name -> node now in its place
    for d in decisions:
        if not _rewrites(d):
            continue
        module = new.get_submodule(d.site.graph) if d.site.graph else new
        # names are those of the graph the sites were found in: a site's output that an
        # earlier rewrite replaced (the previous fused layer) is looked up under its old name
        by_name = {n.name: n for n in module.graph.nodes} | replaced.get(d.site.graph, {})
        old = by_name[d.site.node.name]
        with module.graph.inserting_before(old):
            if d.site.build_qkv is not None:
                qkv = d.site.build_qkv(module.graph, by_name)
            else:
                qkv = tuple(by_name[x.name] for x in (d.site.q, d.site.k, d.site.v))
            qkv = _expand_kv_heads(module.graph, qkv, d)
            node = _call(module.graph, qkv, d)
        old_name = old.name
        if d.site.replace is not None:
            node.meta = {key: val for key, val in old.meta.items() if key != "example_value"}
            replaced.setdefault(d.site.graph, {}).update(d.site.replace(module.graph, old, node))
        else:
            replaced.setdefault(d.site.graph, {})[old_name] = node
            node.meta = dict(old.meta)
            old.replace_all_uses_with(node)
            module.graph.erase_node(old)
        # a node the site's chain shares with a site rewritten before (a value nothing reads
        # that uses both) may be gone already
        _erase_unused(module.graph, [by_name[name] for name in d.site.chain if name in by_name])
    for _, module in graph_modules(new):
        module.graph.lint()
        module.recompile()
    return new
