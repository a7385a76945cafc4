"""Evaluate the constant part of a Dynamo graph at compile time.

A mask or a scale factor that a model builds from constants (`torch.ones(...).tril()`,
`arange` comparisons, `torch.full([], c)`) or slices from a registered buffer
(GPT-2's `bias`) has one value for every call at fixed shapes. `constant_value`
computes it so that the passes can prove what it is (e.g. the causal mask). A
node that depends on a graph input other than a buffer, on randomness, or on
anything mutated in place is not constant: `NotConstant` says why.

Buffers are read as they are at compile time: a model that rewrites its mask
buffer between calls is outside what the passes can prove (noted in README).
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx

# Tensors whose memory holds more than this many elements (a 16k x 16k mask) are not
# evaluated at compile time. Expanded views count the memory under them, not their size.
MAX_ELEMENTS = 1 << 28

_RANDOM = {"rand", "randn", "randint", "rand_like", "randn_like", "randint_like", "bernoulli",
           "dropout", "multinomial", "normal", "uniform_", "bernoulli_", "normal_", "randperm"}


class NotConstant(Exception):
    """The node's value is not known at compile time; the message says why."""


def _op_name(node: fx.Node) -> str:
    return node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")


_OPERATOR_INPLACE = {operator.setitem, operator.iadd, operator.isub, operator.imul, operator.itruediv,
                     operator.iand, operator.ior, operator.ixor, operator.ifloordiv, operator.imod}


def is_mutation(node: fx.Node) -> bool:
    """An in-place op (`x.tril_()`, `x[...] = v`, `x &= y`)."""
    if node.op == "call_function" and getattr(node.target, "__module__", None) in ("_operator", "operator"):
        return node.target in _OPERATOR_INPLACE
    name = _op_name(node)
    return node.op in ("call_function", "call_method") and name.endswith("_") and not name.endswith("__")


def _buffer_value(node: fx.Node) -> torch.Tensor:
    """The real value of a placeholder that Dynamo lifted from a registered buffer."""
    grapharg = node.meta.get("grapharg")
    source = getattr(grapharg, "source", None)
    name = getattr(source, "name", "")
    name = name() if callable(name) else name  # a method on older torch, a property on newer
    if "_buffers" not in str(source) and "_buffers" not in str(name):
        raise NotConstant(f"depends on the graph input '{node.target}'")
    try:
        value = grapharg.example
    except Exception as exc:  # the example was already released
        raise NotConstant(f"the value of buffer '{node.target}' is not available ({exc})") from exc
    if not isinstance(value, torch.Tensor):
        raise NotConstant(f"the value of buffer '{node.target}' is not available")
    return value.detach().clone()


def _is_python_constant(val: Any) -> bool:
    if isinstance(val, (tuple, list)):
        return len(val) > 0 and all(_is_python_constant(v) for v in val)
    return isinstance(val, (bool, int, float))


_VIEWS = {"view", "reshape", "getitem", "transpose", "permute", "expand", "unsqueeze", "squeeze",
          "select", "narrow", "t", "flatten", "unflatten", "as_strided", "diagonal", "view_as",
          "expand_as", "unbind", "split", "chunk", "movedim", "swapaxes", "mT", "T", "contiguous"}


def _views_of(node: fx.Node) -> list[fx.Node]:
    """Nodes that may share `node`'s memory (views of it, of any depth), not `node` itself."""
    found, todo = [], [node]
    while todo:
        for user in todo.pop().users:
            if _op_name(user) in _VIEWS and user not in found:
                found.append(user)
                todo.append(user)
    return found


def _ancestors(node: fx.Node) -> set[fx.Node]:
    seen: set[fx.Node] = set()
    todo = [node]
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        if not _is_python_constant(n.meta.get("example_value")):  # a known size needs no inputs
            todo.extend(n.all_input_nodes)
    return seen


def _memory_elements(val: torch.Tensor) -> int:
    """Elements of memory under a tensor: 1 + the largest offset its strides reach."""
    if val.numel() == 0:
        return 0
    return 1 + sum((size - 1) * abs(stride) for size, stride in zip(val.shape, val.stride()))


def _check_foldable(node: fx.Node) -> None:
    val = node.meta.get("example_value")
    if isinstance(val, torch.Tensor):
        try:
            elements = _memory_elements(val)
        except Exception:  # symbolic sizes or strides
            raise NotConstant(f"'{node.name}' has a dynamic shape") from None
        if elements > MAX_ELEMENTS:
            raise NotConstant(
                f"'{node.name}' holds {elements} elements, more than the {MAX_ELEMENTS} evaluated "
                "at compile time"
            )
    if _op_name(node) in _RANDOM and not (
        _op_name(node) == "dropout" and (node.kwargs.get("training") is False or node.kwargs.get("p") == 0)
    ):
        raise NotConstant(f"'{node.name}' is random")
    for user in node.users:
        # `fresh().masked_fill_(...)` used only through the in-place op's result is fine
        mutated = is_mutation(user) and bool(user.args) and user.args[0] is node
        if mutated and len(node.users) > 1:
            raise NotConstant(f"'{node.name}' is modified in place by '{user.name}'")
    for view in _views_of(node):
        for user in view.users:
            if is_mutation(user) and user.args and user.args[0] is view:
                raise NotConstant(f"'{node.name}' is modified in place through the view '{view.name}'")


def constant_value(node: Any, gm: fx.GraphModule | None = None) -> Any:
    """The value of `node` (or of a plain Python argument) computed from constants and buffers.

    Raises NotConstant when the value depends on inputs, randomness or in-place changes.
    """
    if not isinstance(node, fx.Node):
        return fx.node.map_aggregate(node, lambda a: constant_value(a, gm) if isinstance(a, fx.Node) else a)
    needed = _ancestors(node)
    values: dict[fx.Node, Any] = {}
    # how many evaluations still read each node's value: freed at 0 (masks are large)
    readers = {n: sum(1 for u in n.users if u in needed) for n in needed}
    for n in node.graph.nodes:  # graph order: what runs first is evaluated first
        if n not in needed:
            continue
        for inp in n.all_input_nodes:
            if inp in readers:
                readers[inp] -= 1
        val = n.meta.get("example_value")
        if _is_python_constant(val):
            values[n] = val  # a Python number or shape Dynamo already knows
            continue
        _check_foldable(n)
        if n.op == "placeholder":
            values[n] = _buffer_value(n)
            continue
        if n.op == "get_attr":
            if gm is None:
                raise NotConstant(f"'{n.name}' reads an attribute of an unknown module")
            obj: Any = gm
            for part in str(n.target).split("."):
                obj = getattr(obj, part)
            values[n] = obj.detach().clone() if isinstance(obj, torch.Tensor) else obj
            continue
        if n.op not in ("call_function", "call_method"):
            raise NotConstant(f"'{n.name}' ({n.op}) cannot be evaluated at compile time")
        args = fx.node.map_arg(n.args, values.__getitem__)
        kwargs = fx.node.map_arg(n.kwargs, values.__getitem__)
        try:
            with torch.no_grad():
                if n.op == "call_function":
                    values[n] = n.target(*args, **kwargs)
                else:
                    values[n] = getattr(args[0], n.target)(*args[1:], **kwargs)
        except Exception as exc:
            raise NotConstant(f"evaluating '{n.name}' failed: {exc}") from exc
        for inp in n.all_input_nodes:
            if readers.get(inp) == 0 and inp is not node:
                values.pop(inp, None)
    return values[node]
