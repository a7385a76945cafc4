"""Every attention strategy, declared once: the one list the passes, the report, the
cache key and the ring read. A new strategy is its own folder plus one line here.
(`targets` lists the functions a rewritten graph calls.)"""

from __future__ import annotations

from .block_sparse.strategy import STRATEGY as BLOCK_SPARSE
from .dense.strategy import STRATEGY as DENSE
from .dilated.strategy import STRATEGY as DILATED
from .strategy import Strategy

STRATEGIES: dict[str, Strategy] = {s.name: s for s in (DENSE, DILATED, BLOCK_SPARSE)}


def strategy(name: str) -> Strategy:
    """The strategy called `name` (a policy's ``attention:``, a ring's ``inner``)."""
    try:
        return STRATEGIES[name]
    except KeyError:
        raise ValueError(f"inner={name!r}: expected one of {', '.join(map(repr, STRATEGIES))}") from None
