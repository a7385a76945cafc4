"""The tolerance rule of docs/spec.md ("Qualities that hold everywhere"), shared by the tests.

Error against the float64 reference may be at most twice the error of eager
PyTorch dense attention in the same dtype on the same inputs (plus a floor of
a few units in the last place, for float64, where both are rounding noise).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dilated_compile import dense_reference

FLOOR_ULPS = 8


def dense_error(q, k, v, *, is_causal, scale=None) -> float:
    """Max error of eager SDPA in q's dtype against float64 dense attention."""
    out = F.scaled_dot_product_attention(q, k, v, is_causal=is_causal, scale=scale)
    ref = dense_reference(q.cpu(), k.cpu(), v.cpu(), is_causal=is_causal, scale=scale)
    return (out.double().cpu() - ref).abs().max().item()


def budget(q, k, v, *, is_causal, scale=None, ref=None) -> float:
    """Largest error allowed for an attention of q, k, v."""
    eps = torch.finfo(q.dtype).eps
    mag = 1.0 if ref is None else max(ref.abs().max().item(), 1e-30)
    return 2 * dense_error(q, k, v, is_causal=is_causal, scale=scale) + FLOOR_ULPS * eps * mag


def assert_within(out, ref, q, k, v, *, is_causal, scale=None, what="output") -> None:
    """Assert `out` is within the tolerance rule of `ref` (float64)."""
    assert not torch.isnan(out).any(), f"{what}: NaN"
    err = (out.double().cpu() - ref.double().cpu()).abs().max().item()
    allowed = budget(q, k, v, is_causal=is_causal, scale=scale, ref=ref)
    assert err <= allowed, f"{what}: error {err:.3g} > allowed {allowed:.3g} ({q.dtype})"
