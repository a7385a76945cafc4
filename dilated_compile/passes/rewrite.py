"""Rewrite decided sites in a copy of the graph.

Each rewritten site's node is replaced by a call of the lowering function
that computes the attention the rule asks for; the new node keeps the old
node's metadata (stack trace, module stack, example value) so that Inductor,
error messages and reports still point at the user's code.
"""

from __future__ import annotations

import torch.fx as fx

from ..lowering.dilated import dilated_attention
from .decide import Decision


def copy_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A new GraphModule with a copied graph, sharing `gm`'s submodules and attributes."""
    graph = fx.Graph()
    out = graph.graph_copy(gm.graph, {})
    graph.output(out)
    new = fx.GraphModule(gm, graph, class_name=type(gm).__name__)
    new.meta.update(getattr(gm, "meta", {}))
    return new


def _dilated_call(graph: fx.Graph, qkv: tuple[fx.Node, ...], decision: Decision) -> fx.Node:
    spec, args = decision.rule.dilated, decision.site.args
    return graph.call_function(
        dilated_attention,
        args=(*qkv, spec.segment_lengths, spec.dilation_rates),
        kwargs={"head_split": spec.head_split, "is_causal": args["is_causal"], "scale": args["scale"]},
    )


def rewrite(gm: fx.GraphModule, decisions: list[Decision]) -> fx.GraphModule:
    """`gm` with every site decided as dilated replaced by dilated attention.

    `gm` must be the graph the decisions' sites were found in; it is not changed.
    """
    new = copy_graph_module(gm)
    by_name = {n.name: n for n in new.graph.nodes}
    for d in decisions:
        if d.status != "rewritten" or d.attention != "dilated":
            continue
        old = by_name[d.site.node.name]
        qkv = tuple(by_name[x.name] for x in (d.site.q, d.site.k, d.site.v))
        with new.graph.inserting_before(old):
            node = _dilated_call(new.graph, qkv, d)
        node.meta = dict(old.meta)
        old.replace_all_uses_with(node)
        new.graph.erase_node(old)
    new.graph.lint()
    new.recompile()
    return new
