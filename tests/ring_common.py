"""What the ring cases of `tests/ring_worker.py` share: the setups by name, the full-sequence
inputs and float64 references, the numeric check of a ring against them, an SDPA module and a
`ring:` policy for it, and the check of an expected error.

`DEVICE` and `DIM` are where and how wide the cases make their tensors; `configure` in
`tests/ring_worker.py` sets them here for NCCL, so other modules read them as
``ring_common.DEVICE`` / ``ring_common.DIM`` at call time, never as values imported once.
"""

from __future__ import annotations

import functools
import zlib
from typing import Callable

import torch
import torch.nn.functional as F

from dilated_compile import dense_reference, dilated_reference, ring_attention
from dilated_compile.lowering.reference import block_sparse_reference
from dilated_compile.sharding import ring_info, shard

from .tolerance import budget, FLOOR_ULPS

# where every case makes its tensors; `configure` sets cuda:<rank> for NCCL
DEVICE = torch.device("cpu")
BATCH, HEADS, DIM = 2, 3, 8
CUDA_DIM = 64  # head_dim on CUDA (`configure`): what cuDNN and flash attention run best
N_LOCAL = 8  # positions per rank in the numeric cases (zigzag chunks of 4)
# dilated setups by name: (segment_lengths, dilation_rates, head_split). The first two have
# segments inside a zigzag chunk (no communication); the "long" ones have segments that span
# ranks, do not divide the sequence (ragged last segment) or exceed it.
DILATED = {
    "groups": ((2, 4), (1, 2), "groups"),
    "longnet": ((4, 2), (2, 1), "longnet"),
    "groups-long": ((6, 16), (2, 3), "groups"),
    "longnet-long": ((5, 12, 64), (1, 2, 4), "longnet"),
}
# block-sparse setups by name: (block_size, pattern); blocks cross shard and chunk edges
BLOCK_SPARSE = {
    "local": (3, {"kind": "local_window", "window": 1}),
    "global": (4, {"kind": "global_local", "global_blocks": 1, "window": 0}),
    "strided": (2, {"kind": "dilated", "stride": 3, "window": 0}),
    "mask-mod": (4, {"kind": "mask_mod", "function": "tests.masks:stripes"}),
    "empty-rows": (4, {"kind": "mask_mod", "function": "tests.masks:nothing_before_16"}),
}


class CaseFailure(AssertionError):
    """A check of a case failed on this rank."""


# ---------------------------------------------------------------------------
# numerics: ring result on this rank == float64 reference restricted to it


def _full_inputs(world: int, n_local: int, dtype: torch.dtype, seed: int):
    """Full-sequence q, k, v and output gradient, identical on every rank."""
    g = torch.Generator().manual_seed(seed)  # on the CPU: the same values on every device
    shape = (BATCH, HEADS, world * n_local, DIM)
    return [torch.randn(shape, generator=g).to(DEVICE, dtype) for _ in range(4)]


def _reference(inner: str, setup: str, is_causal: bool, q, k, v, dout):
    """float64 output and (q, k, v) gradients on the full sequence, on the CPU."""
    qd, kd, vd = (t.detach().cpu().double().requires_grad_() for t in (q, k, v))
    if inner == "dense":
        out = dense_reference(qd, kd, vd, is_causal=is_causal)
    elif inner == "dilated":
        seg, rates, split = DILATED[setup]
        out = dilated_reference(qd, kd, vd, seg, rates, head_split=split, is_causal=is_causal)
    else:
        block_size, pattern = BLOCK_SPARSE[setup]
        out = block_sparse_reference(qd, kd, vd, block_size=block_size, pattern=pattern, is_causal=is_causal)
    out.backward(dout.cpu().double())
    return out.detach(), qd.grad, kd.grad, vd.grad


def _grad_budget(q, k, v, dout, is_causal: bool) -> float:
    """The tolerance rule (docs/spec.md, "Qualities that hold everywhere") applied to gradients: twice eager SDPA's gradient error in this dtype, plus a floor."""
    qs, ks, vs = (t.detach().clone().requires_grad_() for t in (q, k, v))
    F.scaled_dot_product_attention(qs, ks, vs, is_causal=is_causal).backward(dout)
    qd, kd, vd = (t.detach().cpu().double().requires_grad_() for t in (q, k, v))
    dense_reference(qd, kd, vd, is_causal=is_causal).backward(dout.cpu().double())
    err = max((a.grad.double().cpu() - b.grad).abs().max().item() for a, b in ((qs, qd), (ks, kd), (vs, vd)))
    mag = max(t.grad.abs().max().item() for t in (qd, kd, vd))
    return 2 * err + FLOOR_ULPS * torch.finfo(q.dtype).eps * mag


def _compare(what: str, got: torch.Tensor, want: torch.Tensor, allowed: float) -> None:
    if torch.isnan(got).any():
        raise CaseFailure(f"{what}: NaN")
    err = (got.detach().double().cpu() - want.detach().double().cpu()).abs().max().item()
    if not err <= allowed:
        raise CaseFailure(f"{what}: error {err:.3g} > allowed {allowed:.3g}")


def _inner_kwargs(inner: str, setup: str) -> dict:
    """ring_attention's arguments for the inner attention of `setup`."""
    if inner == "dilated":
        seg, rates, split = DILATED[setup]
        return dict(segment_lengths=seg, dilation_rates=rates, head_split=split)
    if inner == "block_sparse":
        block_size, pattern = BLOCK_SPARSE[setup]
        return dict(block_size=block_size, pattern=pattern)
    return {}


def numeric_case(
    inner: str, layout: str, is_causal: bool, dtype: torch.dtype, setup: str = "groups",
    n_local: int = N_LOCAL, run: Callable | None = None,
) -> None:
    """Ring output and q/k/v gradients on this rank against the float64 reference."""
    world, _, _ = ring_info()
    seed = zlib.crc32(f"{inner}{setup}{layout}{is_causal}".encode()) % 1000
    q, k, v, dout = _full_inputs(world, n_local, dtype, seed=seed)
    local = [shard(t, 2, layout).clone().requires_grad_() for t in (q, k, v)]
    kwargs = dict(inner=inner, layout=layout, is_causal=is_causal, **_inner_kwargs(inner, setup))
    fn = run if run is not None else functools.partial(ring_attention, **kwargs)
    out = fn(*local)
    out.backward(shard(dout, 2, layout))
    ref_out, *ref_grads = _reference(inner, setup, is_causal, q, k, v, dout)
    _compare("output", out, shard(ref_out, 2, layout), budget(q, k, v, is_causal=is_causal, ref=ref_out))
    allowed = _grad_budget(q, k, v, dout, is_causal)
    for name, t, ref in zip("qkv", local, ref_grads):
        _compare(f"grad {name}", t.grad, shard(ref, 2, layout), allowed)


# ---------------------------------------------------------------------------
# through the backend: a plain SDPA module and a `ring:` policy


class _SDPA(torch.nn.Module):
    def __init__(self, is_causal: bool):
        super().__init__()
        self.is_causal = is_causal

    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=self.is_causal)


def _ring_policy(inner: str, layout: str, setup: str = "groups", **extra) -> dict:
    rule = {"match": "**", "attention": inner, "ring": {"layout": layout}, **extra}
    for key, value in _inner_kwargs(inner, setup).items():
        rule[key] = list(value) if isinstance(value, tuple) else value
    return {"version": 1, "rules": [rule]}


# ---------------------------------------------------------------------------
# the check of an expected error, and a rank's own q, k, v


def expect_error(exc_type: type, fragments: tuple[str, ...], fn: Callable[[], object]) -> None:
    """Run fn; it must raise exc_type with every fragment in the message."""
    try:
        fn()
    except exc_type as e:
        missing = [f for f in fragments if f not in str(e)]
        if missing:
            raise CaseFailure(f"message lacks {missing}: {e}") from e
        return
    raise CaseFailure(f"no {exc_type.__name__} raised")


def _local_qkv(n_local: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(5)
    return [torch.randn(BATCH, HEADS, n_local, DIM, generator=g).to(DEVICE, dtype) for _ in range(3)]
