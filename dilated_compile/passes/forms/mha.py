"""`nn.MultiheadAttention` (and the self-attention of `nn.TransformerEncoderLayer`,
`nn.TransformerDecoderLayer`, `nn.Transformer`).

On torch 2.11-2.13 Dynamo keeps each call as one
`F.multi_head_attention_forward` node whose inputs are (seq, batch, embed)
(the module transposes batch_first inputs before it). A rewritable site is
self-attention (query, key and value the same tensor) without weights
requested, padding mask, bias_k/bias_v, zero attention or active dropout. The
rewrite puts the in-projection, the head split, the attention call, the head
merge and the out-projection in the node's place.
"""

from __future__ import annotations

import inspect
import operator

import torch
import torch.fx as fx
import torch.nn.functional as F

from ..masks import MaskForm, NotProvable, classify, keep_from_mask
from ..fold import NotConstant, constant_value
from ..sites import SDPA_DEFAULTS, Site, module_path, shape_of

TARGET = F.multi_head_attention_forward
_SIGNATURE = inspect.signature(TARGET)


def _bind(node: fx.Node) -> dict:
    bound = _SIGNATURE.bind(*node.args, **node.kwargs)
    bound.apply_defaults()
    return dict(bound.arguments)


def _problem(a: dict, node: fx.Node) -> str | None:
    """Why this call cannot be rewritten exactly, or None."""
    if not (a["query"] is a["key"] is a["value"]):
        return "cross-attention (query, key and value are different tensors)"
    if a["need_weights"] is not False:
        return "the attention weights are returned (need_weights=True; pass need_weights=False)"
    if a["key_padding_mask"] is not None:
        return "has a key_padding_mask (a padding mask)"
    if a["bias_k"] is not None or a["bias_v"] is not None or a["add_zero_attn"] is not False:
        return "uses bias_k / bias_v / add_zero_attn (extra keys)"
    if a["static_k"] is not None or a["static_v"] is not None:
        return "uses static_k / static_v"
    if a["training"] is not False and a["dropout_p"] != 0:
        return f"dropout is active (dropout={a['dropout_p']}, training)"
    if shape_of(a["query"]) is None or len(shape_of(a["query"])) != 3:
        return "unbatched input (2-D query)"
    if any(isinstance(a[name], fx.Node) for name in ("num_heads", "dropout_p", "is_causal")):
        return "num_heads, dropout or is_causal is not a constant"
    if any(len(u.users) and not (u.target is operator.getitem and u.args[1] == 0) for u in node.users):
        return "the attention weights are used"
    return None


def _causal(a: dict, gm: fx.GraphModule, n: int) -> MaskForm:
    """The causal flag and window the call stands for (MHA trusts an is_causal hint);
    NotProvable otherwise."""
    if a["is_causal"] is True:
        return MaskForm(True)
    if a["attn_mask"] is None:
        return MaskForm(False)
    try:
        mask = constant_value(a["attn_mask"], gm)
    except NotConstant as exc:
        raise NotProvable(f"the mask is not a compile-time constant: {exc}") from exc
    if isinstance(mask, torch.Tensor) and mask.dtype == torch.bool:
        mask = ~mask  # MHA's boolean masks mark the positions NOT allowed
    return classify(keep_from_mask(mask), n, n)


def _build_qkv(a: dict, heads: int):
    """build_qkv hook: in-projection and head split, (L, N, E) -> 3 x (N, H, L, E/H)."""
    names = {key: a[key].name for key in ("query", "in_proj_weight", "in_proj_bias",
                                          "q_proj_weight", "k_proj_weight", "v_proj_weight")
             if isinstance(a[key], fx.Node)}
    separate = bool(a["use_separate_proj_weight"])
    seq, batch, embed = shape_of(a["query"])

    def build(graph: fx.Graph, nodes: dict[str, fx.Node]):
        x = nodes[names["query"]]
        bias = nodes.get(names.get("in_proj_bias", ""))
        if separate:
            weights = [nodes[names[f"{c}_proj_weight"]] for c in "qkv"]
        else:
            w = graph.call_method("chunk", (nodes[names["in_proj_weight"]], 3))
            weights = [graph.call_function(operator.getitem, (w, i)) for i in range(3)]
        if bias is not None:
            b = graph.call_method("chunk", (bias, 3))
            biases = [graph.call_function(operator.getitem, (b, i)) for i in range(3)]
        else:
            biases = [None] * 3
        out = []
        for w_i, b_i in zip(weights, biases):
            proj = graph.call_function(F.linear, (x, w_i, b_i))
            split = graph.call_method("reshape", (proj, seq, batch, heads, embed // heads))
            out.append(graph.call_method("permute", (split, 1, 2, 0, 3)))
        return tuple(out)

    return build


def _replace(a: dict):
    """replace hook: head merge and out-projection in place of the call's output 0."""
    w_name, b_name = a["out_proj_weight"].name, getattr(a["out_proj_bias"], "name", None)
    seq, batch, embed = shape_of(a["query"])

    def replace(graph: fx.Graph, old: fx.Node, attention: fx.Node) -> dict[str, fx.Node]:
        nodes = {n.name: n for n in graph.nodes}
        erased = {}
        with graph.inserting_after(attention):
            merged = graph.call_method("permute", (attention, 2, 0, 1, 3))
        with graph.inserting_after(merged):
            flat = graph.call_method("reshape", (merged, seq, batch, embed))
        with graph.inserting_after(flat):
            out = graph.call_function(F.linear, (flat, nodes[w_name], nodes.get(b_name)))
        for user in list(old.users):
            out.meta = dict(user.meta)
            user.replace_all_uses_with(out)
            erased[user.name] = out
            graph.erase_node(user)
        graph.erase_node(old)
        return erased

    return replace


def site_of(node: fx.Node, gm: fx.GraphModule) -> Site:
    a = _bind(node)
    query = a["query"]
    q_val = query.meta.get("example_value") if isinstance(query, fx.Node) else None
    problem = _problem(a, node)
    shape = shape_of(query)
    heads = a["num_heads"]
    qkv_shape = None
    mask_form = MaskForm(False)
    if shape is not None and len(shape) == 3 and isinstance(heads, int):
        seq, batch, embed = shape
        qkv_shape = (batch, heads, seq, embed // heads)
    if problem is None:
        try:
            mask_form = _causal(a, gm, seq)
        except NotProvable as exc:
            problem = f"has an attn_mask that is not provably the causal mask or a sliding window: {exc}"
    is_causal = mask_form.causal
    from_mask = a["attn_mask"] is not None and a["is_causal"] is not True
    site = Site(
        node=node,
        module=module_path(node),
        form="mha" + (mask_form.suffix() if from_mask and (is_causal or mask_form.window) else ""),
        q=query,
        k=a["key"],
        v=a["value"],
        args=dict(SDPA_DEFAULTS, is_causal=is_causal),
        q_shape=qkv_shape,
        k_shape=qkv_shape,
        v_shape=qkv_shape,
        dtype=getattr(q_val, "dtype", None),
        device=str(q_val.device) if q_val is not None else None,
        problem=problem,
        window=mask_form.window,
    )
    if problem is None:
        site.build_qkv = _build_qkv(a, heads)
        site.replace = _replace(a)
    return site


def find(gm: fx.GraphModule) -> list[Site]:
    """Every `F.multi_head_attention_forward` call in `gm` (not its nested graphs)."""
    return [site_of(n, gm) for n in gm.graph.nodes if n.op == "call_function" and n.target is TARGET]


# Inference fast paths (eval mode, no grad): one fused op per layer.
FAST_PATHS = {
    torch._transformer_encoder_layer_fwd: "nn.TransformerEncoderLayer",
    torch._native_multi_head_attention: "nn.MultiheadAttention",
}
FAST_PATH_REASON = (
    "{what}'s inference fast path (eval mode under no_grad) is one fused op ({op}) and {why}; "
    "run the model under torch.enable_grad() or call torch.backends.mha.set_fastpath_enabled(False) "
    "to have its attention found and rewritten"
)
ENCODER_LAYER_PARAMS = (
    "src", "embed_dim", "num_heads", "in_proj_weight", "in_proj_bias", "out_proj_weight", "out_proj_bias",
    "use_gelu", "norm_first", "eps", "norm1_weight", "norm1_bias", "norm2_weight", "norm2_bias",
    "linear1_weight", "linear1_bias", "linear2_weight", "linear2_bias", "mask", "mask_type",
)


def _encoder_layer_args(node: fx.Node) -> dict:
    a = dict(zip(ENCODER_LAYER_PARAMS, node.args))
    a.update(node.kwargs)
    a.setdefault("mask", None)
    a.setdefault("mask_type", None)
    return a


def _encoder_layer_problem(a: dict, gm: fx.GraphModule, seq: int) -> tuple[str | None, MaskForm]:
    """(why the fused encoder layer cannot be rewritten, or None; its causal flag and window)."""
    if any(isinstance(a[key], fx.Node) for key in ("embed_dim", "num_heads", "use_gelu", "norm_first", "eps")):
        return "its configuration is not constant", MaskForm(False)
    if a["mask"] is None:
        return None, MaskForm(False)
    if a["mask_type"] == 1:  # 1: key padding mask only; 0 / 2: attention mask (2: merged, 4-D)
        return "it has a key padding mask", MaskForm(False)
    try:
        mask = constant_value(a["mask"], gm)
        if isinstance(mask, torch.Tensor) and mask.dtype == torch.bool:
            mask = ~mask  # True marks positions NOT allowed, as in nn.MultiheadAttention
        return None, classify(keep_from_mask(mask), seq, seq)
    except (NotConstant, NotProvable) as exc:
        return f"its mask is not provably the causal mask or a sliding window ({exc})", MaskForm(False)


def _encoder_layer_hooks(a: dict):
    """build_qkv / replace hooks that write the fused layer out as its ops, attention in the middle."""
    names = {key: val.name for key, val in a.items() if isinstance(val, fx.Node)}
    batch, seq, embed = shape_of(a["src"])
    heads, eps, norm_first = a["num_heads"], a["eps"], a["norm_first"]

    def ln(graph, x, args, which):
        """LayerNorm with the layer's norm1/norm2 parameters, taken from `args` (layer args by name)."""
        return graph.call_function(
            F.layer_norm, (x, (embed,), args.get(f"norm{which}_weight"), args.get(f"norm{which}_bias"), eps))

    def build(graph: fx.Graph, nodes: dict[str, fx.Node]):
        src = nodes[names["src"]]
        x = ln(graph, src, {key: nodes[name] for key, name in names.items()}, 1) if norm_first else src
        proj = graph.call_function(F.linear, (x, nodes[names["in_proj_weight"]], nodes.get(names.get("in_proj_bias"))))
        split = graph.call_method("reshape", (proj, batch, seq, 3, heads, embed // heads))
        qkv = graph.call_method("permute", (split, 2, 0, 3, 1, 4))
        return tuple(graph.call_function(operator.getitem, (qkv, i)) for i in range(3))

    def replace(graph: fx.Graph, old: fx.Node, attention: fx.Node) -> dict[str, fx.Node]:
        current = _encoder_layer_args(old)  # the nodes as they are now in the graph being rewritten
        src = current["src"]
        get = current.get
        with graph.inserting_before(old):
            merged = graph.call_method("reshape", (graph.call_method("transpose", (attention, 1, 2)), batch, seq, embed))
            sa = graph.call_function(F.linear, (merged, get("out_proj_weight"), get("out_proj_bias")))
            x = graph.call_function(operator.add, (src, sa))
            if not norm_first:
                x = ln(graph, x, current, 1)
            h = ln(graph, x, current, 2) if norm_first else x
            h = graph.call_function(F.linear, (h, get("linear1_weight"), get("linear1_bias")))
            h = graph.call_function(F.gelu if a["use_gelu"] else F.relu, (h,))
            h = graph.call_function(F.linear, (h, get("linear2_weight"), get("linear2_bias")))
            out = graph.call_function(operator.add, (x, h))
            if not norm_first:
                out = ln(graph, out, current, 2)
        out.meta = dict(old.meta)
        old.replace_all_uses_with(out)
        name = old.name
        graph.erase_node(old)
        return {name: out}

    return build, replace


def fast_path_site(node: fx.Node, gm: fx.GraphModule) -> Site:
    """A fused fast-path op: the encoder layer is written out as its ops when it can be;
    otherwise (and for nn.MultiheadAttention's) reported and left with the reason."""
    src = node.args[0]
    val = src.meta.get("example_value") if isinstance(src, fx.Node) else None
    shape, heads = shape_of(src), node.args[2] if len(node.args) > 2 else None
    if node.target is torch._native_multi_head_attention and len(node.args) > 4:
        heads = node.args[4]
    qkv_shape = None
    if shape is not None and len(shape) == 3 and isinstance(heads, int):
        batch, seq, embed = shape  # the fast paths run batch-first only
        qkv_shape = (batch, heads, seq, embed // heads)
    what, op = FAST_PATHS[node.target], node.target.__name__
    problem, mask_form = f"{FAST_PATH_REASON.format(what=what, op=op, why='is not rewritten')}", MaskForm(False)
    if node.target is torch._transformer_encoder_layer_fwd and qkv_shape is not None:
        a = _encoder_layer_args(node)
        why, mask_form = _encoder_layer_problem(a, gm, qkv_shape[2])
        problem = None if why is None else FAST_PATH_REASON.format(what=what, op=op, why=why)
    path = module_path(node)
    if node.target is torch._transformer_encoder_layer_fwd:  # the attention is the layer's self_attn
        path = f"{path}.self_attn" if path else "self_attn"
    site = Site(
        node=node,
        module=path,
        form="encoder-layer-fastpath" if node.target is torch._transformer_encoder_layer_fwd else "mha-fastpath",
        q=src,
        k=src,
        v=src,
        args=dict(SDPA_DEFAULTS, is_causal=mask_form.causal),
        q_shape=qkv_shape,
        k_shape=qkv_shape,
        v_shape=qkv_shape,
        dtype=getattr(val, "dtype", None),
        device=str(val.device) if val is not None else None,
        problem=problem,
        window=mask_form.window,
    )
    if problem is None:
        site.build_qkv, site.replace = _encoder_layer_hooks(a)
    return site


def find_fast_paths(gm: fx.GraphModule) -> list[Site]:
    """Every fused fast-path op in `gm` (not its nested graphs)."""
    return [fast_path_site(n, gm) for n in gm.graph.nodes if n.op == "call_function" and n.target in FAST_PATHS]
