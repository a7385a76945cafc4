"""One site finder per way attention is written (docs/spec.md, "Attention sites").

Each finder takes a GraphModule and returns the `Site`s of its form, with q/k/v
in (batch, heads, seq, head_dim) layout, the causal flag and scale it proved,
and a `problem` when the site cannot be rewritten exactly.
"""

from __future__ import annotations

import torch.fx as fx

from ..sites import Site, graph_modules
from . import hand_written, mha, sdpa

FINDERS = (sdpa.find, hand_written.find, mha.find, mha.find_fast_paths)


def find_sites(gm: fx.GraphModule) -> list[Site]:
    """Every attention site in `gm` and its nested graphs, in graph order."""
    sites = []
    for path, module in graph_modules(gm):
        found = [site for finder in FINDERS for site in finder(module)]
        order = {node: i for i, node in enumerate(module.graph.nodes)}
        for site in sorted(found, key=lambda site: order[site.node]):
            site.graph = path
            sites.append(site)
    return sites


__all__ = ["FINDERS", "find_sites"]
