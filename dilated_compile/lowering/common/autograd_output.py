"""The tensor an `autograd.Function.forward` returns, kept apart from what it saves.

torch 2.11's Dynamo, when it traces an `autograd.Function` (a user calling
`ring_attention` or `dilated_attention` directly inside `torch.compile`),
collects the forward's intermediates as extra outputs of the traced forward.
If the returned tensor is the very tensor also saved for backward, both
outputs share one TensorImpl, autograd's gradient edge is set twice, and the
incoming gradient goes to the wrong slot: every input gradient comes back
zero (pytorch#180642; fixed in 2.12 by filtering aliased intermediates).
On torch before 2.12, while Dynamo traces, the forward returns a view of the
saved tensor instead: its own TensorImpl, no copy.

Nowhere else: an output that is a view of a saved buffer is an alias that
AOTAutograd and Inductor must track through the backward, and in the
backend's own trace it gave wrong ring results on GPU (2 H200s, torch 2.11).
"""

from __future__ import annotations

import torch
from torch.torch_version import TorchVersion

DYNAMO_LOSES_GRADIENTS = TorchVersion(torch.__version__) < "2.12"  # pytorch#180642


def returned_output(out: torch.Tensor) -> torch.Tensor:
    """`out`, as a view (no copy) while Dynamo traces on a torch with pytorch#180642."""
    if DYNAMO_LOSES_GRADIENTS and torch.compiler.is_dynamo_compiling():
        return out.view_as(out)
    return out
