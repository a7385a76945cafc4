"""`F.scaled_dot_product_attention` in every calling style, with an explicit mask
that is provably the causal mask, a sliding window (or masks nothing), and with k/v heads repeated
(`enable_gqa`, `repeat_interleave`, `expand` + `reshape`)."""

from __future__ import annotations

import torch
import torch.fx as fx

from ..masks import NotProvable, prove
from ..sites import SDPA_DEFAULTS, Site, module_path, shape_of

TARGETS = {torch._C._nn.scaled_dot_product_attention, torch.nn.functional.scaled_dot_product_attention}
PARAMS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


def repeats_heads(node) -> bool:
    """True when `node` repeats k/v heads: `repeat_interleave`, or `reshape` of an `expand`."""
    if not isinstance(node, fx.Node):
        return False
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    if name == "repeat_interleave":
        return True
    if name in ("reshape", "view") and node.args and isinstance(node.args[0], fx.Node):
        src = node.args[0]
        return (src.target if isinstance(src.target, str) else getattr(src.target, "__name__", "")) == "expand"
    return False


def _prove_mask(site: Site, gm: fx.GraphModule) -> None:
    """Replace a provably causal, sliding-window (or empty) attn_mask by the causal flag and
    the window; else record the problem."""
    mask = site.args["attn_mask"]
    n_q, n_k = site.query_len, site.key_len
    if not isinstance(n_q, int) or not isinstance(n_k, int):
        site.problem = "has an attn_mask and dynamic shapes (the mask cannot be proved causal)"
        return
    if site.args["is_causal"] is not False:
        site.problem = "has both an attn_mask and is_causal"
        return
    try:
        found = prove(mask, gm, n_q, n_k)
    except NotProvable as exc:
        site.problem = f"has an attn_mask that is not provably the causal mask or a sliding window: {exc}"
        return
    site.args["attn_mask"] = None
    site.args["is_causal"] = found.causal
    site.window = found.window
    site.form += found.suffix()


def site_of(node: fx.Node, gm: fx.GraphModule) -> Site:
    """The site of one SDPA call."""
    bound = dict(zip(PARAMS, node.args))
    bound.update(node.kwargs)
    args = {name: bound.get(name, default) for name, default in SDPA_DEFAULTS.items()}
    q, k, v = bound["query"], bound["key"], bound["value"]
    val = q.meta.get("example_value") if isinstance(q, fx.Node) else None
    site = Site(
        node=node,
        module=module_path(node),
        form="sdpa",
        q=q,
        k=k,
        v=v,
        args=args,
        q_shape=shape_of(q),
        k_shape=shape_of(k),
        v_shape=shape_of(v),
        dtype=getattr(val, "dtype", None),
        device=str(val.device) if val is not None else None,
    )
    if repeats_heads(k) and repeats_heads(v):
        site.form += "+repeat-kv"
    if args["attn_mask"] is not None:
        _prove_mask(site, gm)
    return site


def find(gm: fx.GraphModule) -> list[Site]:
    """Every SDPA call in `gm` (not its nested graphs)."""
    return [
        site_of(node, gm)
        for node in gm.graph.nodes
        if node.op == "call_function" and node.target in TARGETS
    ]
