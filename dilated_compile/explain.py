"""`explain`: what the backend would do to a model, without running Inductor."""

from __future__ import annotations

import torch

from .passes import Report, run_passes
from .policy import load_policy


def explain(model: torch.nn.Module, *example_inputs, policy, **example_kwargs) -> Report:
    """Run Dynamo and the rewrite on `model` (not Inductor) and return the report.

    The model runs once on the example inputs with its rewritten graphs
    executed eagerly. `report.sites` has one entry per attention site,
    `report.diff` the graph diff, `str(report)` the table.
    """
    loaded = load_policy(policy)
    graphs = []

    def capture(gm, inputs, **_):
        new, report = run_passes(gm, loaded)
        graphs.append(report)
        return new.forward

    compiled = torch.compile(model, backend=capture)
    compiled(*example_inputs, **example_kwargs)
    return Report(graphs)
