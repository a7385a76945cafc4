"""Ring cases for attention with a sliding-window mask, run by `tests/ring_worker.py` (every
rank, the same order): the ring's result on each rank equals full-sequence windowed attention
(float64 reference) restricted to its positions, output and q/k/v gradients, for windows
smaller than a shard, equal to one and spanning several; contiguous and zigzag; only keys
within the window are exchanged. One case goes through the backend (a window-masked SDPA
site under an ``attention: dense`` ring rule)."""

from __future__ import annotations

import functools
import zlib
from typing import Callable

import torch
import torch.nn.functional as F

from dilated_compile import dense_reference, ring_attention
from dilated_compile.lowering.block_sparse.window import dense_window_spec
from dilated_compile.lowering.ring.window_exchange import window_plan
from dilated_compile.sharding import ring_info, shard

from .tolerance import budget

N_LOCAL = 8  # positions per rank (zigzag chunks of 4)
# window sizes by name, against a shard of N_LOCAL positions
WINDOWS = {"inside": 3, "shard": N_LOCAL, "spans": N_LOCAL + 5}


class WindowCaseFailure(AssertionError):
    """A check of a window case failed on this rank."""


# where the cases make their tensors (`window_cases`: the worker's device)
DEVICE = torch.device("cpu")


def _compare(what: str, got: torch.Tensor, want: torch.Tensor, allowed: float) -> None:
    err = (got.detach().cpu().double() - want.detach().double()).abs().max().item()
    if torch.isnan(got).any() or not err <= allowed:
        raise WindowCaseFailure(f"{what}: error {err:.3g} > allowed {allowed:.3g}")


def _inputs(world: int, seed: int):
    g = torch.Generator().manual_seed(seed)  # on the CPU: the same values on every device
    return [torch.randn(2, 3, world * N_LOCAL, 8, generator=g).to(DEVICE) for _ in range(4)]


def _check(out, local, q, k, v, dout, layout: str, window: int, is_causal: bool) -> None:
    """Output and gradients on this rank against the float64 windowed reference (on the CPU)."""
    q, k, v, dout = (t.detach().cpu() for t in (q, k, v, dout))
    full = [t.double().requires_grad_() for t in (q, k, v)]
    ref = dense_reference(*full, is_causal=is_causal, window=window)
    ref.backward(dout.double())
    _compare("output", out, shard(ref, 2, layout), budget(q, k, v, is_causal=is_causal, ref=ref))
    allowed = 4 * budget(q, k, v, is_causal=is_causal)
    for name, t, want in zip("qkv", local, full):
        _compare(f"grad {name}", t.grad, shard(want.grad, 2, layout), allowed)


def window_case(layout: str, size: str, is_causal: bool, op: bool = False) -> None:
    """ring_attention with the block-sparse parameters of a dense window (what the rewrite
    calls; `op`: through the ring custom op, what a site with a symbolic size calls); the plan
    exchanges only keys within the window."""
    from dilated_compile.lowering.ring.op import dynamic_ring_attention

    world, rank, group_name = ring_info()
    window = WINDOWS[size]
    q, k, v, dout = _inputs(world, zlib.crc32(f"{layout}{size}{is_causal}".encode()) % 1000)
    spec = dense_window_spec(window)
    local = [shard(t, 2, layout).clone().requires_grad_() for t in (q, k, v)]
    if op:
        pattern = {"kind": "local_window", "window": 1, "token_window": window}
        out = dynamic_ring_attention(*local, world_size=world, rank=rank, group_name=group_name,
                                     inner="block_sparse", layout=layout, is_causal=is_causal,
                                     block_size=spec.block_size, pattern=pattern)
    else:
        out = ring_attention(*local, inner="block_sparse", layout=layout, is_causal=is_causal,
                             block_sparse=spec)
    out.backward(shard(dout, 2, layout))
    _check(out, local, q, k, v, dout, layout, window, is_causal)
    plan = window_plan(world, rank, N_LOCAL, layout, is_causal, spec.pattern, spec.block_size)
    if plan is None:
        return  # the window reaches nearly every key: the rotating ring sends no more
    total = world * N_LOCAL
    mine = plan.positions
    for source, keys in enumerate(plan.key_positions):
        if source == rank:
            continue
        for p in keys:  # every key received is within the window of a query here
            if not any((0 <= i - p < window) if is_causal else abs(i - p) < window for i in mine):
                raise WindowCaseFailure(f"key at {p} of rank {source} received, outside every window")
    if size == "inside" and sum(map(len, plan.needed)) >= total - N_LOCAL:
        raise WindowCaseFailure(f"a window of {window} exchanged {plan.needed}")


class _WindowSDPA(torch.nn.Module):
    """SDPA with a causal sliding-window mask built from arange (as HF models do)."""

    def __init__(self, window: int):
        super().__init__()
        self.window = window

    def forward(self, q, k, v):
        n = q.shape[-2]
        i = torch.arange(n)
        d = i[:, None] - i[None, :]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=(d >= 0) & (d < self.window))


def window_backend_case(layout: str) -> None:
    """A window-masked SDPA site under a dense ring rule: each rank's model builds the mask for
    its shard's length, a window smaller than the shard, which the rewrite keeps on global
    positions; rewritten into the ring with the window, numerics as window_case."""
    import dilated_compile

    torch._dynamo.reset()
    world, _, _ = ring_info()
    window = WINDOWS["inside"]
    q, k, v, dout = _inputs(world, 7)
    policy = {"version": 1, "rules": [{"match": "**", "attention": "dense", "ring": {"layout": layout}}]}
    model = torch.compile(_WindowSDPA(window), backend="dilated", options={"policy": policy})
    local = [shard(t, 2, layout).clone().requires_grad_() for t in (q, k, v)]
    out = model(*local)
    out.backward(shard(dout, 2, layout))
    site = dilated_compile.reports()[-1].sites[0]
    if site.status != "rewritten" or f"sliding window W={window}" not in (site.attention or ""):
        raise WindowCaseFailure(f"site report: {site.form} {site.status} {site.attention!r} {site.reason!r}")
    if "within the window, exchanged" not in site.attention:
        raise WindowCaseFailure(f"site report: {site.attention!r}, want keys exchanged within the window")
    _check(out, local, q, k, v, dout, layout, window, True)


def window_cases(world: int, device: torch.device) -> dict[str, Callable[[], None]]:
    """The window cases for `world` ranks, by name, with tensors on `device`."""
    global DEVICE
    DEVICE = torch.device(device)
    out: dict[str, Callable[[], None]] = {}
    for layout in ("contiguous", "zigzag"):
        for size in WINDOWS:
            causal = size != "shard" or layout == "zigzag"
            out[f"window-{size}-{layout}-{'causal' if causal else 'full'}"] = functools.partial(
                window_case, layout, size, causal)
    out["window-op-inside-contiguous-causal"] = functools.partial(window_case, "contiguous", "inside", True, True)
    if world == 2:
        out["window-backend-zigzag"] = functools.partial(window_backend_case, "zigzag")
    return out
