"""The sliding window a site runs with: its mask's, or the one a rule states (``window: W``).

A sliding window is read from the mask the model builds for the sequence it
is given. Under a ring every rank's model builds the mask for its own shard:
where the window W is at least the shard's length L, that mask is the causal
mask (no mask for a bidirectional window) and the site looks like plain
attention. A rule's ``window: W`` says what the mask cannot: the site runs with
the window W on global positions (under a ring, across ranks).

A stated window must agree with the site's own mask: a window of exactly W,
or, where L <= W, the causal mask (no mask for a bidirectional window). Anything
else is a reason to leave the site (`window_for`).

Without ``window:``, a site under a ring over several ranks whose mask on the
shard is plain, while the module that owns it declares a sliding window of at
least L (HF attention modules: their ``sliding_window`` attribute, else their
``config.sliding_window`` for the layer), is found by `unstated_windows`: the
backend warns (`WindowWarning`), or raises under ``strict: true``.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch.fx as fx
import torch.nn as nn

from ..frames import module_object

if TYPE_CHECKING:
    from ..policy.model import Rule
    from .sites import Site

__all__ = ["WindowWarning", "UnstatedWindow", "window_for", "declared_window", "unstated_window"]


class WindowWarning(UserWarning):
    """Under a ring, a site's module declares a sliding window that its mask on the shard
    does not show, and no rule states it."""


def _positive_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 1


def _at_most(n: Any, window: int) -> bool | None:
    """n <= window: True or False where known for every value of n's symbols, else None
    (adds no guard)."""
    if isinstance(n, int):
        return n <= window
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    if statically_known_true(n <= window):
        return True
    if statically_known_true(n > window):
        return False
    return None


def _plain_mask(site: Site) -> str:
    return "the causal mask" if site.args.get("is_causal") is True else "no mask"


def window_for(site: Site, rule: Rule, over_ranks: bool) -> tuple[int | None, str | None]:
    """(the sliding window the site runs with, None: none; why the rule's stated window
    disagrees with the site's mask, else None). `over_ranks`: the site holds one rank's shard
    of a ring over several ranks. Call on a site that can be rewritten exactly otherwise."""
    stated = rule.window
    if stated is None:
        return site.window, None
    where = f"rules[{rule.index}] '{rule.match}' states window: {stated}"
    if site.window is not None:
        if site.window == stated:
            return stated, None
        return None, (f"{where}, but its mask is a sliding window of {site.window}; state the "
                      f"model's window (`window: {site.window}`) or fix the model's mask")
    n = site.query_len
    fits = _at_most(n, stated)
    shard = "this rank's shard of " if over_ranks else ""
    if fits is False:
        return None, (f"{where}, but its mask on {shard}{n} positions is {_plain_mask(site)}, not a "
                      f"window of {stated}; state the model's window, or remove `window:` from the rule")
    if fits is None:
        return None, (f"{where} and its mask is {_plain_mask(site)} at a symbolic length {n}, which "
                      f"is not provably at most {stated}: a window cannot be told from a plain mask; "
                      "compile with static shapes")
    # L <= W: the mask shows nothing of the window. Over the whole sequence it changes nothing;
    # over a shard it reaches keys on other ranks.
    return (stated if over_ranks else None), None


def owning_module(node: fx.Node) -> nn.Module | None:
    """The module object that owns `node` (the one `sites.module_path` names), while the
    backend compiles a Dynamo frame; None otherwise or when it cannot be found."""
    stack = node.meta.get("nn_module_stack") or {}
    return module_object(list(stack.values())[-1][0] if stack else None)


def declared_window(module: nn.Module | None) -> tuple[int, str] | None:
    """(W, where it was read) when `module` declares a sliding window of W tokens, else None:
    its own ``sliding_window`` attribute (None: no window), else the ``sliding_window`` of its
    ``config`` when the config applies it to the module's layer (``layer_types[layer_idx]`` is
    ``"sliding_attention"`` where the config has layer types, and ``use_sliding_window`` is not
    false)."""
    if module is None:
        return None
    own = getattr(module, "sliding_window", _MISSING)
    if own is not _MISSING:
        return (int(own), f"{type(module).__name__}.sliding_window") if _positive_int(own) else None
    config = getattr(module, "config", None)
    window = getattr(config, "sliding_window", None)
    if not _positive_int(window) or getattr(config, "use_sliding_window", True) is False:
        return None
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        index = getattr(module, "layer_idx", None)
        if not isinstance(index, int) or not 0 <= index < len(layer_types):
            return None  # which layer it is is unknown
        if layer_types[index] != "sliding_attention":
            return None
    return int(window), f"config.sliding_window of {type(module).__name__}"


_MISSING = object()


@dataclass(frozen=True)
class UnstatedWindow:
    """A ring site whose module declares a sliding window its shard's mask does not show."""

    module: str  # dotted module path of the site ("" = root)
    node: str
    rule: Rule
    window: int  # the declared window
    source: str  # where it was read
    shard_len: int
    causal: bool

    def message(self) -> str:
        """What the user is told."""
        shape = "i - W < j <= i" if self.causal else "|i - j| < W"
        return (
            f"attention in {self.module or '<root>'} ({self.node}) under the ring of rules[{self.rule.index}] "
            f"'{self.rule.match}': the model's attention module declares a sliding window "
            f"({self.source} = {self.window}), but its mask on this rank's shard of {self.shard_len} "
            f"positions is {'the causal mask' if self.causal else 'no mask'}, so the ring runs "
            "attention over the whole sequence, not the window. State the window in the rule: "
            f"`window: {self.window}` (key j allowed for query i when {shape}, global positions)"
            + ("" if self.causal else "; check the model's convention for a bidirectional window")
        )


def unstated_window(site: Site, rule: Rule) -> UnstatedWindow | None:
    """For a site rewritten into a ring over several ranks under `rule`: the window its owning
    module declares while its mask on the shard shows none and the rule states none, else None."""
    if rule.window is not None or site.window is not None or not isinstance(site.query_len, int):
        return None
    declared = declared_window(owning_module(site.node))
    if declared is None or declared[0] < site.query_len:
        return None  # a window shorter than the shard shows in the shard's mask
    causal = site.args.get("is_causal") is True
    return UnstatedWindow(site.module, site.node.name, rule, declared[0], declared[1], site.query_len, causal)
