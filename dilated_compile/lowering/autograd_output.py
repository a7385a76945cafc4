"""The tensor an `autograd.Function.forward` returns, kept apart from what it saves.

torch 2.11's Dynamo, when it traces an `autograd.Function` (a user calling
`ring_attention` or `dilated_attention` directly inside `torch.compile`),
collects the forward's intermediates as extra outputs of the traced forward.
If the returned tensor is the very tensor also saved for backward, both
outputs share one TensorImpl, autograd's gradient edge is set twice, and the
incoming gradient goes to the wrong slot: every input gradient comes back
zero (pytorch#180642; fixed in 2.12 by filtering aliased intermediates).
Returning a view of the saved tensor while Dynamo traces gives the output its
own TensorImpl at no cost, on every torch version.
"""

from __future__ import annotations

import torch


def returned_output(out: torch.Tensor) -> torch.Tensor:
    """`out` as a separate tensor object (a view, no copy) while Dynamo traces the forward;
    `out` itself otherwise (eager, and the backend's own AOTAutograd trace, where an output
    that is a view of a saved tensor is not needed)."""
    return out.view_as(out) if torch.compiler.is_dynamo_compiling() else out
