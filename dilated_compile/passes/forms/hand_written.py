"""Hand-written attention: ``softmax(q @ k^T * scale + mask) @ v``.

The families Inductor's own attention fusion recognises: `matmul` / `@` /
`einsum` for both products (`bmm` is found too and left: 3-D tensors carry no
head count), scale by multiply or divide with a compile-time constant, a
causal mask by `masked_fill`, `where` or an additive mask, `softmax` with dtype
casts around it, eval-mode dropout. The site is the final `@ v`; the nodes in
between (`chain`) are erased by the rewrite when nothing else uses them. Uses
of those nodes whose results nothing reads do not count, and are erased too.

Attention whose ops between `q @ kᵀ`, the softmax and `@ v` are not all
understood (soft-capping, a bias added by `baddbmm`, a reshape, weights
changed after the softmax) is still a site, left with the reason
(`unrecognised.py` finds its outline).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from ..fold import NotConstant, constant_value, is_mutation
from ..liveness import read_users, unread_below, unread_nodes
from ..masks import MaskForm, NotProvable, classify, is_masking_value, keep_from_additive, padding_hint
from ..sites import SDPA_DEFAULTS, Site, module_path, shape_of

MATMULS = {operator.matmul, torch.matmul, torch.bmm, "matmul", "bmm", "__matmul__"}
EINSUMS = {torch.einsum, torch.functional.einsum}
SOFTMAXES = {torch.softmax, torch.nn.functional.softmax, torch.special.softmax, "softmax"}
CASTS = {"to", "float", "half", "bfloat16", "double", "type", "type_as", "contiguous"}
DROPOUTS = {torch.nn.functional.dropout, torch.dropout, "dropout"}
MULS = {operator.mul, torch.mul, "mul"}
DIVS = {operator.truediv, torch.div, torch.true_divide, "div", "truediv"}
ADDS = {operator.add, torch.add, "add"}
WHERES = {torch.where, "where"}
MASKED_FILLS = {torch.masked_fill, "masked_fill"}
TRANSPOSES = {"transpose", torch.transpose, "permute", torch.permute, "swapaxes", torch.swapaxes,
              "swapdims", torch.swapdims}


def _is(node, targets) -> bool:
    return isinstance(node, fx.Node) and node.op in ("call_function", "call_method") and node.target in targets


def _ndim(node) -> int | None:
    shape = shape_of(node)
    return None if shape is None else len(shape)


@dataclass
class _Scores:
    """What the walk up from the softmax found."""

    q: fx.Node
    k: fx.Node
    scale: float = 1.0
    keeps: list = field(default_factory=list)  # compile-time keep patterns (bool tensors)
    chain: list = field(default_factory=list)
    problem: str | None = None


def _constant(x, gm):
    return constant_value(x, gm) if isinstance(x, fx.Node) else x


def _scalar(x, gm) -> float | None:
    """A compile-time scalar (Python number or one-element constant tensor), else None."""
    try:
        value = _constant(x, gm)
    except NotConstant:
        return None
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _untransposed_key(node) -> fx.Node | None:
    """k when `node` is k with its last two dims swapped (`transpose(-2, -1)`, `swapaxes`,
    `permute(0, 1, 3, 2)`, `mT`), maybe made contiguous."""
    if _is(node, {"contiguous"}) and len(node.args) == 1 and not node.kwargs:
        node = node.args[0]
    nd = _ndim(node)
    if nd is None or not isinstance(node, fx.Node):
        return None
    if node.op == "call_function" and node.target is getattr and node.args[1:] == ("mT",):
        return node.args[0]
    if not _is(node, TRANSPOSES) or not node.args:
        return None
    src, dims = node.args[0], list(node.args[1:])
    if len(dims) == 1 and isinstance(dims[0], (list, tuple)):
        dims = list(dims[0])
    dims = [d % nd for d in dims if isinstance(d, int)]
    name = node.target if isinstance(node.target, str) else node.target.__name__
    if name in ("transpose", "swapaxes", "swapdims") and len(dims) == 2 and sorted(dims) == [nd - 2, nd - 1]:
        return src
    if name == "permute" and dims == [*range(nd - 2), nd - 1, nd - 2]:
        return src
    return None


def _canonical(equation: str) -> str:
    """The equation with its letters renamed in order of first appearance ("bhqd,..." -> "abcd,...")."""
    rename: dict[str, str] = {}
    for c in equation:
        if c.isalpha() and c not in rename:
            rename[c] = chr(ord("a") + len(rename))
    return "".join(rename.get(c, c) for c in equation)


def _einsum_operands(node, wanted: str):
    """The two operands of an einsum whose equation is `wanted` up to renaming letters."""
    if not _is(node, EINSUMS) or not isinstance(node.args[0], str):
        return None
    equation, operands = node.args[0].replace(" ", ""), node.args[1:]
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = tuple(operands[0])
    if len(operands) != 2 or "." in equation:
        return None
    return operands if _canonical(equation) == _canonical(wanted) else None


def _walk_scores(node, gm, out: _Scores | None = None) -> _Scores | None:
    """Walk from the softmax input up to `q @ k^T`, collecting scale and masks."""
    if not isinstance(node, fx.Node):
        return None
    if _is(node, MATMULS) and len(node.args) == 2:
        k = _untransposed_key(node.args[1])
        if k is None:
            return None
        return _Scores(q=node.args[0], k=k, chain=[node.args[1], node])
    ops = _einsum_operands(node, "bhqd,bhkd->bhqk")
    if ops is not None:
        return _Scores(q=ops[0], k=ops[1], chain=[node])
    if _is(node, CASTS) and node.args:
        found = _walk_scores(node.args[0], gm)
    elif _is(node, MULS | DIVS) and len(node.args) == 2:
        found = None
        for i, j in ((0, 1), (1, 0)):
            if _is(node, DIVS) and i == 1:
                break
            found = _walk_scores(node.args[i], gm)
            if found is not None:
                factor = _scalar(node.args[j], gm)
                if factor is None and _uses(node.args[j], set(found.chain)):
                    how = "divided" if _is(node, DIVS) else "multiplied"
                    found.problem = found.problem or (
                        f"the scores are modified before the softmax ({how} by a function of the "
                        "scores): score functions are not rewritten"
                    )
                elif factor is None:
                    found.problem = found.problem or "the scores are scaled by a value that is not a compile-time constant"
                else:
                    found.scale *= 1.0 / factor if _is(node, DIVS) else factor
                break
    elif _is(node, ADDS) and len(node.args) == 2:
        found = None
        for i, j in ((0, 1), (1, 0)):
            found = _walk_scores(node.args[i], gm)
            if found is not None:
                _add_mask(found, node.args[j], gm, lambda m: keep_from_additive(m))
                break
    elif _is(node, WHERES) and len(node.args) == 3:
        found = _walk_scores(node.args[1], gm)
        if found is not None:
            _fill_mask(found, node.args[0], node.args[2], gm, keep_where_true=True)
        else:  # where(masked, fill, scores)
            found = _walk_scores(node.args[2], gm)
            if found is not None:
                _fill_mask(found, node.args[0], node.args[1], gm, keep_where_true=False)
    elif _is(node, MASKED_FILLS) and len(node.args) == 3:
        found = _walk_scores(node.args[0], gm)
        if found is not None:
            _fill_mask(found, node.args[1], node.args[2], gm, keep_where_true=False)
    else:
        return None
    if found is not None:
        found.chain.append(node)
    return found


def _uses(node, targets: set, limit: int = 64) -> bool:
    """Whether `node` is computed from one of `targets` (searching at most `limit` nodes up)."""
    todo, seen = [node], set()
    while todo and len(seen) < limit:
        n = todo.pop()
        if n in targets:
            return True
        if isinstance(n, fx.Node) and n not in seen:
            seen.add(n)
            todo.extend(n.all_input_nodes)
    return False


def _add_mask(found: _Scores, mask, gm, to_keep) -> None:
    try:
        value = _constant(mask, gm)
        if not isinstance(value, torch.Tensor):
            raise NotProvable(f"the mask is a {type(value).__name__}")
        found.keeps.append(to_keep(value))
    except NotConstant as exc:
        found.problem = found.problem or (
            f"has a mask or bias that is not a compile-time constant: {exc}{padding_hint(exc)}"
        )
    except NotProvable as exc:
        found.problem = found.problem or f"has a mask that is not provably the causal mask or a sliding window: {exc}"


def _fill_mask(found: _Scores, cond, fill, gm, *, keep_where_true: bool) -> None:
    fill_value = _scalar(fill, gm)
    if fill_value is None or not is_masking_value(fill_value):
        found.problem = found.problem or (
            f"masks scores with {fill_value if fill_value is not None else 'a non-constant value'}, "
            "not -inf or the dtype's minimum"
        )
        return

    def to_keep(value):
        if value.dtype != torch.bool:
            raise NotProvable(f"the mask condition has dtype {value.dtype}")
        return value if keep_where_true else ~value

    _add_mask(found, cond, gm, to_keep)


def _value_operand(user: fx.Node, weights: fx.Node) -> fx.Node | None:
    """v when `user` is `weights @ v` (matmul or einsum), else None."""
    if _is(user, MATMULS) and len(user.args) == 2 and user.args[0] is weights:
        return user.args[1]
    ops = _einsum_operands(user, "bhqk,bhkd->bhqd")
    return ops[1] if ops is not None and ops[0] is weights else None


def _walk_weights(softmax: fx.Node, unread: frozenset = frozenset()):
    """Walk from the softmax down to `weights @ v`: (final matmul, v, chain, problem) or None.
    Uses of the weights that nothing reads (`unread`) are not followed."""
    chain, node, problem = [softmax], softmax, None
    while True:
        users = read_users(node, unread)
        if len(users) != 1:
            final = next((u for u in users if _value_operand(u, node) is not None), None)
            if final is None:
                return None
            problem = "the attention weights are used outside the attention (returned to the caller?)"
            return final, _value_operand(final, node), chain, problem
        (user,) = users
        v = _value_operand(user, node)
        if v is not None:
            return user, v, chain, problem
        if _is(user, CASTS) and user.args[0] is node:
            pass
        elif _is(user, DROPOUTS) and user.args[0] is node:
            p = user.kwargs.get("p", user.args[1] if len(user.args) > 1 else 0.5)
            training = user.kwargs.get("training", user.kwargs.get("train", user.args[2] if len(user.args) > 2 else True))
            if training is not False and p != 0:
                problem = problem or f"dropout is active (p={p}, training={training})"
        else:
            return None
        chain.append(user)
        node = user


def _softmax_dim_is_last(node: fx.Node) -> bool:
    dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
    nd = _ndim(node)
    return isinstance(dim, int) and nd is not None and dim % nd == nd - 1


def site_of(softmax: fx.Node, gm: fx.GraphModule, unread: frozenset | None = None) -> Site | None:
    """The site whose softmax is `softmax`, None when it is not attention.

    `unread`: the graph's nodes whose results nothing reads (computed when not given);
    uses of the site's intermediate values among them do not keep it from a rewrite,
    and they join its chain, to be erased with it."""
    if not _softmax_dim_is_last(softmax) or not softmax.args:
        return None
    if unread is None:
        unread = unread_nodes(softmax.graph)
    scores = _walk_scores(softmax.args[0], gm)
    down = _walk_weights(softmax, unread)
    if scores is None or down is None:
        return outline_site(softmax, unread)
    final, v, weights_chain, problem = down
    problem = scores.problem or problem
    mask_form = MaskForm(False)
    if problem is None and scores.keeps:
        q_shape, k_shape = shape_of(scores.q), shape_of(scores.k)
        keep = scores.keeps[0]
        try:
            for other in scores.keeps[1:]:
                keep = keep & other
            mask_form = classify(keep, q_shape[-2], k_shape[-2])
        except (NotProvable, RuntimeError) as exc:
            problem = f"has a mask that is not provably the causal mask or a sliding window: {exc}"
    is_causal = mask_form.causal
    chain = [*scores.chain, *weights_chain]
    if problem is None and any(is_mutation(u) for n in chain for u in n.users):
        problem = "the attention scores are modified in place (e.g. masked_fill_); not rewritten"
    if problem is None and any(len(read_users(n, unread)) != 1 for n in chain):
        problem = "intermediate attention scores are used outside the attention"
    chain += unread_below(chain, unread)
    out_val, q_val = final.meta.get("example_value"), scores.q.meta.get("example_value")
    if problem is None and getattr(out_val, "dtype", None) != getattr(q_val, "dtype", None):
        problem = f"the output dtype {getattr(out_val, 'dtype', None)} differs from the query's"
    form = "einsum-softmax" if _is(final, EINSUMS) else "matmul-softmax"
    # one k/v head broadcast over every query head (multi-query attention written with broadcasting)
    k_shape = shape_of(scores.k)
    broadcast_kv = k_shape is not None and len(k_shape) == 4 and k_shape[1] == 1
    args = dict(SDPA_DEFAULTS, is_causal=is_causal, scale=scores.scale, enable_gqa=broadcast_kv)
    return Site(
        node=final,
        module=module_path(final),
        form=form + (mask_form.suffix() if is_causal or mask_form.window is not None else ""),
        q=scores.q,
        k=scores.k,
        v=v,
        args=args,
        q_shape=shape_of(scores.q),
        k_shape=shape_of(scores.k),
        v_shape=shape_of(v),
        dtype=getattr(q_val, "dtype", None),
        device=str(q_val.device) if q_val is not None else None,
        problem=problem,
        chain=tuple(n.name for n in chain),
        window=mask_form.window,
    )


# Ops between the scores and the softmax that the exact walk carries over when their
# operands allow it, and ops that change only the shape.
_CARRIED_UP = CASTS | MULS | DIVS | ADDS | WHERES | MASKED_FILLS
_CARRIED_DOWN = CASTS | DROPOUTS
_RESHAPES = {"view", "reshape", "flatten", "unflatten", "unsqueeze", "squeeze", "expand", "contiguous"}


def _names(nodes) -> str:
    """The nodes' op names, each once, in order."""
    from .unrecognised import op_name

    return ", ".join(dict.fromkeys(op_name(n) for n in nodes))


def _outline_reasons(found) -> list[str]:
    """Why the attention outlined by `found` (an `unrecognised.Outline`) is not rewritten."""
    from .unrecognised import op_name

    reasons = []
    if _is(found.product, {torch.baddbmm, "baddbmm"}):
        reasons.append("the scores are computed by baddbmm, which adds a bias to them (ALiBi, as in BLOOM?)")
    elif _is(found.product, EINSUMS) and _einsum_operands(found.product, "bhqd,bhkd->bhqk") is None:
        reasons.append(f"the scores are computed by einsum('{found.product.args[0]}'), "
                       "not in the (batch, heads, seq, head_dim) layout")
    elif _is(found.product, MATMULS) and _untransposed_key(found.k) is None:
        args = ", ".join(str(a) for a in found.k.args[1:])
        reasons.append(f"the keys enter the scores as {op_name(found.k)}({args}), not as k.transpose(-2, -1)")
    modified = [n for n in found.up if not _is(n, _CARRIED_UP) and op_name(n) not in _RESHAPES]
    reshaped = [n for n in found.up if not _is(n, _CARRIED_UP) and op_name(n) in _RESHAPES]
    if modified:
        reasons.append(f"the scores are modified before the softmax ({_names(modified)}): "
                       "soft-capping and other functions of the scores are not rewritten")
    if reshaped:
        reasons.append(f"the scores are reshaped before the softmax ({_names(reshaped)})")
    changed = [n for n in found.down if not _is(n, _CARRIED_DOWN) and op_name(n) not in _RESHAPES]
    reshaped = [n for n in found.down if not _is(n, _CARRIED_DOWN) and op_name(n) in _RESHAPES]
    if changed:
        reasons.append(f"the attention weights are changed after the softmax ({_names(changed)}) "
                       "before they multiply v")
    if reshaped:
        reasons.append(f"the attention weights are reshaped after the softmax ({_names(reshaped)})")
    if not reasons:
        reasons.append(f"the ops between the scores and the softmax ({_names(found.up) or 'none'}) "
                       "are not in a form that is rewritten")
    return reasons


def outline_site(softmax: fx.Node, unread: frozenset = frozenset()) -> Site | None:
    """A site left with the reason, for attention (q @ kᵀ ... softmax ... @ v) around `softmax`
    that the exact walk does not understand; None when there is no such attention."""
    from .unrecognised import is_transposing, outline

    found = outline(softmax, unread)
    if found is None:
        return None
    k, k_shape = _untransposed_key(found.k), None
    if k is not None:
        k_shape = shape_of(k)
    else:
        k, k_shape = found.k, shape_of(found.k)
        if k_shape is not None and len(k_shape) >= 2 and not _is(found.product, EINSUMS):
            if is_transposing(found.k) or _is(found.product, {torch.baddbmm, "baddbmm"}):
                k_shape = (*k_shape[:-2], k_shape[-1], k_shape[-2])  # the product takes k transposed
    q_val = found.q.meta.get("example_value")
    return Site(
        node=found.final,
        module=module_path(found.final),
        form="einsum-softmax" if _is(found.final, EINSUMS) else "matmul-softmax",
        q=found.q,
        k=k,
        v=found.v,
        args=dict(SDPA_DEFAULTS),
        q_shape=shape_of(found.q),
        k_shape=k_shape,
        v_shape=shape_of(found.v),
        dtype=getattr(q_val, "dtype", None),
        device=str(q_val.device) if q_val is not None else None,
        problem="; ".join(_outline_reasons(found)),
    )


def find(gm: fx.GraphModule) -> list[Site]:
    """Every hand-written attention in `gm` (not its nested graphs)."""
    sites = []
    unread = unread_nodes(gm.graph)
    for node in gm.graph.nodes:
        if _is(node, SOFTMAXES):
            site = site_of(node, gm, unread)
            if site is not None:
                sites.append(site)
    return sites
