"""Decide what each attention site becomes under a policy.

A decision says which rule matched, whether the site is rewritten, into what,
and if it is left as it was, why. Sites that a rule targets but that cannot be
rewritten exactly are `targeted` and left: with ``strict: true`` the backend
raises for them instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.fx as fx

from ..lowering.block_sparse.window import windowed_spec
from ..lowering.ring.layout import check_local_shape
from ..policy.model import Policy, Rule
from ..sharding import RingInfo, ring_info
from .sites import Site
from .stated_window import window_for

if TYPE_CHECKING:
    from ..lowering.strategy import Strategy

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass
class Decision:
    """What the policy makes of one site."""

    site: Site
    rule: Rule | None
    status: str  # "rewritten" | "left"
    attention: str | None  # what it became, e.g. "dilated", None when left
    reason: str | None  # why it was left, else None
    targeted: bool  # a rule asked for a rewrite
    ring: RingInfo | None = None  # the ring the site runs over (world size 1: runs locally)
    dynamic: bool = False  # symbolic sequence length: runs through a custom op (lowering/*/op.py)
    # The sliding window the site runs with (None: none): its mask's, as the passes proved it,
    # or the rule's stated `window:` (passes/stated_window.py)
    window: int | None = None

    def inner(self) -> tuple["Strategy", object]:
        """The strategy that computes the rewritten site and its parameters: the rule's, or
        for a site with a sliding-window mask the block-sparse attention that keeps the window
        (`lowering.block_sparse.window`)."""
        from ..lowering.registry import strategy  # here: at the top it would lengthen the import chain

        kind = strategy(self.rule.attention)
        if self.window is None:
            return kind, kind.spec(self.rule)
        return strategy("block_sparse"), windowed_spec(self.rule.attention, kind.spec(self.rule), self.window)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


# Attention kinds a site with a symbolic sequence length can become.
DYNAMIC_ATTENTION = ("dilated", "block_sparse")


def is_dynamic(site: Site) -> bool:
    """Whether any size of q/k/v is symbolic (dynamic shapes)."""
    return not all(_is_int(x) for x in (*site.q_shape, *site.k_shape, *site.v_shape))


def _provably_equal(a, b) -> bool:
    """a == b for every value of the symbols in them (adds no guard)."""
    if _is_int(a) and _is_int(b):
        return a == b
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    return bool(statically_known_true(a == b))


def why_not_dynamic(site: Site) -> str | None:
    """Why a site with symbolic sizes cannot be rewritten, or None if it can: only the
    batch and sequence sizes may be symbolic, and q/k/v's must be provably equal."""
    q, k, v = site.q_shape, site.k_shape, site.v_shape
    if not all(_is_int(x) for x in (q[1], k[1], v[1], q[3], k[3], v[3])):
        return f"symbolic head count or head_dim {q}: only batch and sequence length may be dynamic"
    for i, what in ((0, "batch"), (2, "sequence length")):
        if not (_provably_equal(q[i], k[i]) and _provably_equal(k[i], v[i])):
            return f"q/k/v {what} are symbolic and not provably equal: {q}, {k}, {v}"
    return None


def _dropout_value(p):
    """dropout_p as a number where it is one. Under dynamic shapes Dynamo passes a float
    module attribute as a symbolic float (``tensor.item()``); it is read here with a
    guard on its value, so a graph whose dropout is 0 is rewritten, and a change of the
    attribute recompiles. Other values (no example value) are returned unchanged."""
    value = p.meta.get("example_value") if isinstance(p, fx.Node) else None
    if isinstance(value, torch.SymFloat):
        from torch.fx.experimental.symbolic_shapes import guard_float

        return guard_float(value)
    return p


def why_not_exact(site: Site) -> str | None:
    """Why the site cannot be rewritten into an exact equivalent, or None if it can."""
    a = site.args
    if site.problem is not None:
        return site.problem
    if site.q_shape is None or site.k_shape is None or site.v_shape is None:
        return "shapes of q/k/v unknown (no example values in the graph)"
    if len(site.q_shape) != 4 or len(site.k_shape) != 4 or len(site.v_shape) != 4:
        return f"q/k/v are not 4-D (batch, heads, seq, head_dim): {site.q_shape}"
    if is_dynamic(site):
        problem = why_not_dynamic(site)
        if problem is not None:
            return problem
    if site.query_len != site.key_len:
        return f"query length {site.query_len} != key length {site.key_len} (cross-attention or KV cache)"
    if a["attn_mask"] is not None:
        return "has an attn_mask (only attn_mask=None is rewritten)"
    p = _dropout_value(a["dropout_p"])
    if not isinstance(p, (int, float)) or p != 0:
        return f"dropout is active (dropout_p={p})"
    if not isinstance(a["is_causal"], bool):
        return "is_causal is not a constant"
    if a["scale"] is not None and not isinstance(a["scale"], (int, float)):
        return "scale is not a constant"
    hq, hk, hv = site.q_shape[1], site.k_shape[1], site.v_shape[1]
    if hk != hv:
        return f"key heads {hk} != value heads {hv}"
    if hq != hk and not (a["enable_gqa"] is True and hq % hk == 0):
        return (
            f"query heads {hq} != key/value heads {hk} without enable_gqa=True "
            "(or not a multiple of them)"
        )
    if site.q_shape[0] != site.k_shape[0] or site.k_shape[:3] != site.v_shape[:3]:
        return f"q/k/v batch or length differ: {site.q_shape}, {site.k_shape}, {site.v_shape}"
    if site.v_shape[-1] != site.q_shape[-1]:
        return f"value head_dim {site.v_shape[-1]} != query head_dim {site.q_shape[-1]}"
    if site.dtype not in SUPPORTED_DTYPES:
        return f"dtype {site.dtype} is not supported"
    return None


def why_no_window(window: int | None, rule: Rule) -> str | None:
    """Why a site's sliding window cannot be kept under `rule`, or None if it can: dense and
    block-sparse attention keep it, dilated attention does not."""
    if window is None or rule.attention != "dilated":
        return None
    return (
        f"its mask is a sliding window (W={window}), which dilated attention does not keep; "
        "use attention: dense (runs the window exactly) or block_sparse (the pattern within the window)"
    )


def _left(site, rule, reason, targeted) -> Decision:
    return Decision(site, rule, "left", None, reason, targeted, window=site.window)


def _why_no_ring(site: Site, rule: Rule, ring: RingInfo) -> str | None:
    """Why the site cannot run as a ring over `ring`, or None if it can.

    A symbolic local length is checked per call by the custom op (a check here
    would add a guard on the length, e.g. its parity under zigzag).
    """
    if ring.world_size == 1 or not _is_int(site.query_len):
        return None
    try:
        check_local_shape(site.query_len, rule.ring.layout, ring.world_size)
    except ValueError as exc:
        return str(exc)
    return None


def decide(site: Site, policy: Policy) -> Decision:
    """The decision for one site: first matching rule, length threshold, exactness.

    Under a ring rule the site holds one rank's shard: lengths in the policy
    (min_seq_len) are compared with the global length, shard x world size. A rule's
    ``window:`` is checked against the site's mask and gives the window it runs with
    (`stated_window.window_for`).
    """
    rule = policy.rule_for(site.module)
    if rule is None:
        return _left(site, None, f"no rule matches module '{site.module}'", False)
    ring = ring_info(rule.ring.group) if rule.ring is not None else None
    n = site.key_len
    if _is_int(n) and ring is not None:
        n = n * ring.world_size
    if _is_int(n) and n < rule.min_seq_len:
        return _left(
            site, rule, f"key length {n} < min_seq_len {rule.min_seq_len} of rules[{rule.index}]", False
        )
    local = ring is None or ring.world_size == 1
    window = site.window
    if rule.window is not None:  # a stated window: checked against the site's mask first
        problem = why_not_exact(site)
        if problem is None:
            window, problem = window_for(site, rule, not local)
        if problem is not None:
            return _left(site, rule, problem, True)
    if rule.attention == "dense" and local and (window is None or is_dynamic(site)):
        return Decision(site, rule, "rewritten", "dense (unchanged)", None, True, ring, window=window)
    problem = why_not_exact(site) or why_no_window(window, rule)
    if problem is None and ring is not None:
        problem = _why_no_ring(site, rule, ring)
    if problem is not None:
        return _left(site, rule, problem, True)
    if is_dynamic(site):
        ring_over_ranks = ring is not None and ring.world_size > 1
        if not ring_over_ranks and rule.attention not in DYNAMIC_ATTENTION:
            return _left(
                site, rule, f"dynamic (symbolic) sequence length: {rule.attention} is not rewritten yet", True
            )
        if ring_over_ranks:  # the ring custom op (lowering/ring/op.py), any inner attention
            return Decision(site, rule, "rewritten", "ring", None, True, ring, dynamic=True, window=window)
        # world size 1: the inner attention's own custom op, run locally
        return Decision(site, rule, "rewritten", rule.attention, None, True, ring, dynamic=True, window=window)
    if ring is not None and ring.world_size > 1:
        return Decision(site, rule, "rewritten", "ring", None, True, ring, window=window)
    return Decision(site, rule, "rewritten", rule.attention, None, True, ring, window=window)
