"""Dense attention, declared as a strategy (see `lowering.strategy`): a site stays as it
was (`Functions.static` is None), and a ring runs it with rotating key/value shards."""

from __future__ import annotations

from ..strategy import Functions, Strategy


def _load() -> Functions:
    from .functions import FUNCTIONS

    return FUNCTIONS


STRATEGY = Strategy(
    name="dense",
    spec_type=None,
    parameters=(),
    site_arguments=lambda spec: ((), {}),
    ring_parameters=lambda spec: {},
    describe=lambda spec, n: "dense",
    encode=lambda **_: "{}",
    decode=lambda text: None,
    load=_load,
)
