"""Attention shapes that the exact hand-written walk does not understand.

When the walk from a softmax up to ``q @ kᵀ`` or down to ``@ v`` meets an op
it cannot carry over (a `tanh` soft-cap, a `view`, a `baddbmm` that adds a
bias, a key not given as `transpose(-2, -1)`), the site must still be listed,
left with the reason. This module finds the outline of attention around a
softmax without understanding the ops in between: the nearest product of two
tensors with a transposed right operand (or an einsum contracting the last
dims) above it, the nearest product that consumes it below, and the ops on the
way. The walks only follow nodes as large as the scores, so they stay inside
the attention.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx

# How many nodes a walk visits before it gives up.
MAX_VISITED = 32

_MATMULS = {operator.matmul, torch.matmul, torch.bmm, "matmul", "bmm", "__matmul__"}
_BADDBMMS = {torch.baddbmm, "baddbmm"}
_EINSUMS = {torch.einsum, torch.functional.einsum}
_TRANSPOSING = {torch.transpose, torch.permute, torch.swapaxes, torch.swapdims, torch.movedim, torch.t,
                "transpose", "permute", "swapaxes", "swapdims", "movedim", "t"}


@dataclass
class Outline:
    """q @ kᵀ ... softmax ... @ v, with the ops between them not understood."""

    product: fx.Node  # the node that computes the scores
    q: fx.Node
    k: fx.Node  # the right operand of the product, as the product takes it
    final: fx.Node  # the node that multiplies the weights by v
    v: fx.Node
    up: list[fx.Node]  # the nodes from the product (excluded) up to the softmax's input
    down: list[fx.Node]  # the nodes from the softmax (excluded) down to the final product (excluded)


def op_name(node: fx.Node) -> str:
    """The name of a node's op (`tanh`, `view`, `mul`, ...)."""
    if node.target is getattr and len(node.args) > 1:
        return str(node.args[1])
    target = node.target
    return target if isinstance(target, str) else getattr(target, "__name__", str(target))


def _is(node, targets) -> bool:
    return isinstance(node, fx.Node) and node.op in ("call_function", "call_method") and node.target in targets


def _numel(node):
    val = node.meta.get("example_value") if isinstance(node, fx.Node) else None
    return val.numel() if isinstance(val, torch.Tensor) else None


def _same_size(a, b) -> bool:
    """a == b for every value of the symbols in them (adds no guard)."""
    if a is None or b is None:
        return False
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    try:
        return bool(statically_known_true(a == b))
    except Exception:
        return False


def is_transposing(node) -> bool:
    """`node` swaps dims of another tensor (`transpose`, `permute`, `mT`, ...), maybe made contiguous."""
    if _is(node, {"contiguous"}):
        node = node.args[0]
    if isinstance(node, fx.Node) and node.op == "call_function" and node.target is getattr:
        return len(node.args) > 1 and node.args[1] in ("mT", "mH", "T")
    return _is(node, _TRANSPOSING)


def _einsum(node):
    """(inputs, output, operands) of a two-operand einsum, else None."""
    if not _is(node, _EINSUMS) or not node.args or not isinstance(node.args[0], str):
        return None
    equation, operands = node.args[0].replace(" ", ""), node.args[1:]
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = tuple(operands[0])
    if "->" not in equation or len(operands) != 2:
        return None
    inputs, output = equation.split("->")
    inputs = inputs.split(",")
    return (inputs, output, operands) if len(inputs) == 2 else None


def _is_parameter(node) -> bool:
    """A weight of the model (a module attribute or a lifted parameter), not a computed tensor."""
    if _is(node, {"contiguous"}):
        node = node.args[0]
    if is_transposing(node):
        node = node.args[0]
    if not isinstance(node, fx.Node):
        return False
    return node.op == "get_attr" or (node.op == "placeholder" and "_parameters_" in str(node.target))


def score_operands(node) -> tuple[fx.Node, fx.Node] | None:
    """(q, k as the product takes it) when `node` is a product of q and a transposed k
    (not a weight of the model: `x @ W.t()` is a projection)."""
    if _is(node, _MATMULS) and len(node.args) == 2 and is_transposing(node.args[1]):
        return None if _is_parameter(node.args[1]) else (node.args[0], node.args[1])
    if _is(node, _BADDBMMS):
        a = dict(zip(("input", "batch1", "batch2"), node.args), **node.kwargs)
        if isinstance(a.get("batch1"), fx.Node) and isinstance(a.get("batch2"), fx.Node):
            return a["batch1"], a["batch2"]
    einsum = _einsum(node)
    if einsum is not None:
        (left, right), output, operands = einsum
        if left and right and left[-1] == right[-1] and left[-1] not in output:
            return operands[0], operands[1]
    return None


def _weights_operand(node, weights: fx.Node) -> fx.Node | None:
    """v when `node` multiplies `weights` by v, else None."""
    if _is(node, _MATMULS) and len(node.args) == 2 and node.args[0] is weights:
        return node.args[1]
    einsum = _einsum(node)
    if einsum is not None and einsum[2][0] is weights:
        return einsum[2][1]
    return None


def _path(parents: dict, node: fx.Node) -> list[fx.Node]:
    path = []
    while node is not None:
        path.append(node)
        node = parents[node]
    return path


def _walk_up(start: fx.Node):
    """The nearest score product above `start` through nodes as large as `start`, and the path."""
    size, parents, todo = _numel(start), {start: None}, [start]
    while todo and len(parents) <= MAX_VISITED:
        node = todo.pop(0)
        if score_operands(node) is not None:
            return node, _path(parents, node)[1:]
        for src in node.all_input_nodes:
            if src not in parents and src.op in ("call_function", "call_method") and _same_size(_numel(src), size):
                parents[src] = node
                todo.append(src)
    return None


def _walk_down(softmax: fx.Node, unread: frozenset):
    """The nearest product below `softmax` that takes the weights as its left operand, v, and the path."""
    size, parents, todo = _numel(softmax), {softmax: None}, [softmax]
    while todo and len(parents) <= MAX_VISITED:
        node = todo.pop(0)
        for user in node.users:
            if user in parents or user in unread:
                continue
            v = _weights_operand(user, node)
            if v is not None:
                return user, v, list(reversed(_path(parents, node)))[1:]
            if user.op in ("call_function", "call_method") and _same_size(_numel(user), size):
                parents[user] = node
                todo.append(user)
    return None


def outline(softmax: fx.Node, unread: frozenset = frozenset()) -> Outline | None:
    """The attention around `softmax` (a softmax over its last dim), None when there is none."""
    if not softmax.args or not isinstance(softmax.args[0], fx.Node):
        return None
    up, down = _walk_up(softmax.args[0]), _walk_down(softmax, unread)
    if up is None or down is None:
        return None
    (product, up_path), (final, v, down_path) = up, down
    q, k = score_operands(product)
    return Outline(product=product, q=q, k=k, final=final, v=v, up=up_path, down=down_path)
