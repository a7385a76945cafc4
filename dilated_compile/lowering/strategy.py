"""The record that declares one attention strategy (a policy's ``attention:`` value).

A strategy is declared once, in its own folder (``<folder>/strategy.py``), and
listed once in `registry`. The rewrite, the report, the cache key and the ring
read these records instead of comparing strategy names.

A declaration is light: its name, its policy spec type, how a rule's spec
becomes call arguments and report text, and how its parameters travel as one
string argument of a custom op. The functions that compute the attention are
in a second record, `Functions`, that the declaration loads on first use
(``strategy.functions``), so that reading the registry imports no kernels.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from typing import Any, Callable, Mapping


@dataclass(frozen=True)
class RingArgs:
    """The ring a site runs over, as constants computed at compile time."""

    world_size: int
    rank: int
    group_name: str  # "" for no process group
    layout: str  # "contiguous" | "zigzag"

    def encode(self) -> str:
        """The canonical text of the ring (a custom-op argument); `decode_ring` reads it."""
        return canonical(
            {
                "world_size": self.world_size,
                "rank": self.rank,
                "group": self.group_name,
                "layout": self.layout,
            }
        )


@lru_cache(maxsize=256)
def decode_ring(text: str) -> RingArgs:
    """The `RingArgs` that `RingArgs.encode` wrote as `text`."""
    d = json.loads(text)
    return RingArgs(int(d["world_size"]), int(d["rank"]), str(d["group"]), str(d["layout"]))


@dataclass(frozen=True)
class Functions:
    """What computes a strategy's attention; every field takes (B, H, N, D) q, k, v.

    - `static(q, k, v, *args, **kwargs)`: what a site with static lengths
      becomes (arguments from `Strategy.site_arguments`); None: the site stays.
    - `dynamic(q, k, v, *args, min_seq_len=, **kwargs)`: the same through the
      strategy's custom op, for a symbolic sequence length; None: such a site
      is left.
    - `ring_inner(q, k, v, *, world_size, rank, group_name, layout, is_causal,
      scale, **parameters)`: this rank's shard of the attention run as a
      ring's inner attention (static lengths, traced).
    - `ring_forward(q, k, v, ring, is_causal, scale, params) -> (out, lse)` and
      `ring_backward(dout, q, k, v, out, lse, ring, is_causal, scale, params)
      -> (dq, dk, dv)`: the same inside the ring custom op (eager, explicit
      backward); `params` is what `Strategy.decode` returns.
    - `key_traffic(n_local, layout, world_size, rank, is_causal, **parameters)`:
      how the ring moves keys and values, in words for the site report.
    """

    static: Callable | None
    dynamic: Callable | None
    ring_inner: Callable
    ring_forward: Callable
    ring_backward: Callable
    key_traffic: Callable[..., str]


@dataclass(frozen=True)
class Strategy:
    """One attention strategy, declared once.

    - `name`: the policy's ``attention:`` value, and the ring's ``inner``.
    - `spec_type`: the rule's parameter record (``rule.<name>``), None for none.
    - `parameters`: the keyword names of its parameters in `ring_attention`
      and the rewritten call.
    - `site_arguments(spec) -> (args, kwargs)`: the arguments after q, k, v of
      the call a site is rewritten to (static and dynamic alike).
    - `ring_parameters(spec) -> dict`: its parameters as `ring_attention_local`
      keywords.
    - `describe(spec, n) -> str`: what the report says it became (`n`: the
      global key length when known).
    - `encode(**parameters) -> str` / `decode(text)`: its parameters as one
      custom-op argument, validated, and back (cached).
    - `load() -> Functions`: imports what computes it (`functions`, cached).
    - `kernel(spec, shape, dtype, device, is_causal) -> str | None`: which kernel a
      site of these query shape, dtype and device runs, and why, for the report
      (None: nothing to say).
    """

    name: str
    spec_type: type | None
    parameters: tuple[str, ...]
    site_arguments: Callable[[Any], tuple[tuple, dict]]
    ring_parameters: Callable[[Any], dict]
    describe: Callable[[Any, Any], str]
    encode: Callable[..., str]
    decode: Callable[[str], Any]
    load: Callable[[], Functions] = field(repr=False)
    kernel: Callable[..., str | None] | None = field(default=None, repr=False)

    @cached_property
    def functions(self) -> Functions:
        return self.load()

    def spec(self, rule: Any) -> Any:
        """The rule's parameter record for this strategy (None when it has none)."""
        return getattr(rule, self.name, None) if self.spec_type is not None else None

    def pick(self, arguments: Mapping[str, Any]) -> dict:
        """This strategy's parameters out of a call's keyword arguments."""
        return {name: arguments[name] for name in self.parameters}


def canonical(value: Any) -> str:
    """`value` as canonical JSON (sorted keys, no spaces): equal values, equal text."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"))
