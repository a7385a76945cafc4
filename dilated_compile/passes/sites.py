"""Find attention sites in a Dynamo FX graph (docs/spec.md, "Attention sites").

A site is a node that computes standard attention, with what the rest of the
pipeline needs to know about it: the owning module's dotted path, the form
it was written in, its tensors' shapes, and its arguments (causal, scale,
mask, dropout). The finders, one per form, and `find_sites`, which runs them,
are in `passes/forms/`; this module holds what they share. It only looks; it
changes nothing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx as fx

from ..frames import absolute_path, owner_path

SDPA_DEFAULTS = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}


@dataclass
class Site:
    """One attention computation found in the graph."""

    node: fx.Node
    module: str  # dotted module path, "" for the root module
    form: str  # how it was written: "sdpa", "sdpa+causal-mask", "matmul-softmax", "mha", ...
    q: fx.Node
    k: fx.Node
    v: fx.Node
    args: dict[str, Any] = field(default_factory=dict)  # attn_mask, dropout_p, is_causal, scale, enable_gqa
    q_shape: tuple | None = None
    k_shape: tuple | None = None
    v_shape: tuple | None = None
    dtype: torch.dtype | None = None
    device: str | None = None
    graph: str = ""  # path of the (sub)graph module holding the node, "" for the top graph
    problem: str | None = None  # why the form found cannot be rewritten exactly, else None
    # The sliding window its mask keeps (|i - j| < window; with is_causal also j <= i), None
    # for none: proved by passes/masks.py, carried to the rewrite.
    window: int | None = None
    # Nodes of a hand-written site that only the site uses: erased after the rewrite when unused.
    chain: tuple[str, ...] = ()
    # Forms whose q/k/v are not nodes of the graph (nn.MultiheadAttention): build them before the
    # site, as build_qkv(graph, nodes_by_name) -> (q, k, v) in (batch, heads, seq, head_dim) ...
    build_qkv: Callable | None = None
    # ... and put the attention's output in place of the site: replace(graph, site_node, attention_node)
    # returns {name of a node it erased: the node now in its place}.
    replace: Callable | None = None

    @property
    def key_len(self):
        return None if self.k_shape is None else self.k_shape[-2]

    @property
    def query_len(self):
        return None if self.q_shape is None else self.q_shape[-2]


_FQN_PARTS = (
    # a wrapper's *args holding the root module: L['args'][0] -> root
    (re.compile(r"^L\['args'\]\[0\]\.?"), ""),
    (re.compile(r"^[LG]\['[^']*'\]\.?"), ""),  # L['self'] (or a global G['m']) -> root
    (re.compile(r"\._modules\['([^']*)'\]"), r".\1"),
    (re.compile(r"\['([^']*)'\]"), r".\1"),
    (re.compile(r"\[(\d+)\]"), r".\1"),
)


def module_path(node: fx.Node) -> str:
    """Dotted path of the module that owns `node` ("" for the root module): its name in
    the outermost model while the backend compiles a Dynamo frame (see `frames`), else
    the path relative to the graph's root. Attention written in the frame's own method
    (no module call around it) belongs to the frame's module."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return owner_path() or ""
    path, _ = list(stack.values())[-1]
    absolute = absolute_path(path)
    if absolute is not None:
        return absolute
    for pattern, repl in _FQN_PARTS:
        path = pattern.sub(repl, path)
    return path.strip(".")


def shape_of(node: Any) -> tuple | None:
    """Shape of a node's example value, None when it has none."""
    val = node.meta.get("example_value") if isinstance(node, fx.Node) else None
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def graph_modules(gm: fx.GraphModule) -> list[tuple[str, fx.GraphModule]]:
    """`gm` and every GraphModule nested in it (bodies of higher-order ops such
    as activation checkpointing), with their paths ("" for `gm`)."""
    return [(name, m) for name, m in gm.named_modules() if isinstance(m, fx.GraphModule)]
