"""Which nodes of a graph compute a value that nothing reads.

A node is *unread* when it has no effect of its own (no mutation, no
randomness, no side effect that DCE must keep) and every node that uses it is
unread too: no path leads from it to the graph's output or to a node with an
effect. The site finders ignore such uses of an attention's intermediate
values (a dead `scores.clone()`), and the rewrite erases them with the chain.
Nothing here changes the graph.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from .fold import is_mutation

# Names of ops that draw random numbers (they advance the generator even when their result is unused).
_RANDOM_WORDS = ("rand", "bernoulli", "dropout", "multinomial", "normal", "uniform", "exponential",
                 "cauchy", "geometric", "poisson")


def _name(node: fx.Node) -> str:
    return node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")


def has_effect(node: fx.Node) -> bool:
    """Whether `node` must run even when nothing reads its result."""
    if node.op not in ("call_function", "call_method"):
        return node.op != "get_attr"  # placeholders, output and modules are kept
    if node.target is getattr or node.target is operator.getitem:
        return False
    if isinstance(node.target, torch._ops.HigherOrderOperator):
        return True
    if is_mutation(node) or "out" in node.kwargs:
        return True
    if any(word in _name(node).lower() for word in _RANDOM_WORDS):
        return True
    try:
        return node.is_impure()
    except Exception:  # purity unknown: keep it
        return True


def unread_nodes(graph: fx.Graph) -> frozenset[fx.Node]:
    """Nodes whose results nothing reads, transitively, and that have no effect."""
    unread: set[fx.Node] = set()
    for node in reversed(graph.nodes):
        if not has_effect(node) and all(user in unread for user in node.users):
            unread.add(node)
    return frozenset(unread)


def read_users(node: fx.Node, unread: frozenset[fx.Node]) -> list[fx.Node]:
    """The users of `node` whose results something reads."""
    return [user for user in node.users if user not in unread]


def unread_below(nodes, unread: frozenset[fx.Node]) -> list[fx.Node]:
    """Every unread node that uses one of `nodes`, directly or through other unread nodes."""
    found: list[fx.Node] = []
    seen: set[fx.Node] = set()
    todo = [user for node in nodes for user in node.users if user in unread]
    while todo:
        node = todo.pop()
        if node not in seen:
            seen.add(node)
            found.append(node)
            todo.extend(user for user in node.users if user in unread)
    return found
