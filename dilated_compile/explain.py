"""`explain`: what the backend would do to a model, without running Inductor."""

from __future__ import annotations

import torch

from .frames import current_frame, resolving
from .passes import Report, run_passes
from .policy import load_policy
from .targets import check_targets, forget, note_frame


def explain(model: torch.nn.Module, *example_inputs, policy, **example_kwargs) -> Report:
    """Run Dynamo and the rewrite on `model` (not Inductor) and return the report.

    The model runs once on the example inputs with its rewritten graphs
    executed eagerly. `report.sites` has one entry per attention site,
    `report.diff` the graph diff, `str(report)` the table. What the policy targeted
    but did not get (rules matching no site, targeted modules whose attention ran
    outside compiled code) is warned about on return, or raised under `strict: true`.
    """
    loaded = load_policy(policy)
    graphs = []

    def capture(gm, inputs, **_):
        frame = current_frame()
        with resolving(frame):
            new, report = run_passes(gm, loaded)
        note_frame(frame, loaded, report)
        graphs.append(report)
        return new.forward

    forget(model)
    compiled = torch.compile(model, backend=capture)
    try:
        compiled(*example_inputs, **example_kwargs)
        check_targets(model, _stacklevel=4)  # the call is over: warn once for what was targeted and not got
    finally:
        forget(model)
    return Report(graphs)
