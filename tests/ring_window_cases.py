"""Ring cases for attention with a sliding-window mask, run by `tests/ring_worker.py` (every
rank, the same order): the ring's result on each rank equals full-sequence windowed attention
(float64 reference) restricted to its positions, output and q/k/v gradients, for windows
smaller than a shard, equal to one and spanning several; contiguous and zigzag; only keys
within the window are exchanged. One case goes through the backend (a window-masked SDPA
site under an ``attention: dense`` ring rule). A window at least a shard long, which each
rank's mask shows as the causal mask: stated in the rule (``window: W``) it runs across
ranks (through the backend, and rewritten and run eagerly); not stated, the module's declared
window is warned about (an error under ``strict: true``); a stated window the mask
contradicts is an error on every rank."""

from __future__ import annotations

import functools
import warnings
import zlib
from typing import Callable

import torch
import torch.nn.functional as F

from dilated_compile import dense_reference, ring_attention
from dilated_compile.lowering.block_sparse.window import dense_window_spec
from dilated_compile.lowering.ring.window_exchange import window_plan
from dilated_compile.sharding import ring_info, shard

from .models import WindowedAttention, rewritten_eager
from .ring_common import expect_error
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


def _ring_policy(layout: str, window: int | None = None, strict: bool = False) -> dict:
    rule = {"match": "**", "attention": "dense", "ring": {"layout": layout}}
    if window is not None:
        rule["window"] = window
    return {"version": 1, "strict": strict, "rules": [rule]}


def stated_window_case(layout: str, size: str, compiled: bool) -> None:
    """A module declaring a window at least a shard long builds the causal mask for its shard;
    the rule's ``window:`` runs the window across ranks: output and gradients equal the windowed
    reference on the full sequence; the backend warns of nothing. `compiled`: through the backend
    (Inductor), else the rewritten graph run eagerly."""
    import dilated_compile

    torch._dynamo.reset()
    world, _, _ = ring_info()
    window = WINDOWS[size]
    q, k, v, dout = _inputs(world, 11)
    policy = _ring_policy(layout, window)
    local = [shard(t, 2, layout).clone().requires_grad_() for t in (q, k, v)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if compiled:
            model = torch.compile(WindowedAttention(window), backend="dilated", options={"policy": policy})
        else:
            model = rewritten_eager(WindowedAttention(window), policy)
        out = model(*local)
    out.backward(shard(dout, 2, layout))
    told = [str(w.message) for w in caught if issubclass(w.category, dilated_compile.WindowWarning)]
    if told:
        raise WindowCaseFailure(f"warned with the window stated: {told}")
    if compiled:
        site = dilated_compile.reports()[-1].sites[0]
        if site.form != "sdpa+causal-mask" or f"sliding window W={window}" not in (site.attention or ""):
            raise WindowCaseFailure(f"site report: {site.form} {site.status} {site.attention!r} {site.reason!r}")
    _check(out, local, q, k, v, dout, layout, window, True)


def unstated_window_case() -> None:
    """No ``window:`` in the ring rule while the module declares a window as long as the shard:
    a WindowWarning naming the module and the key to add; under ``strict: true`` an error."""
    import dilated_compile

    torch._dynamo.reset()
    world, _, _ = ring_info()
    window = WINDOWS["shard"]
    local = [shard(t, 2, "contiguous") for t in _inputs(world, 12)[:3]]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dilated_compile.explain(WindowedAttention(window), *local, policy=_ring_policy("contiguous"))
    told = [str(w.message) for w in caught if issubclass(w.category, dilated_compile.WindowWarning)]
    want = (f"declares a sliding window (WindowedAttention.sliding_window = {window})",
            f"this rank's shard of {N_LOCAL} positions is the causal mask", f"`window: {window}`")
    if len(told) != 1 or not all(f in told[0] for f in want):
        raise WindowCaseFailure(f"warnings: {told}")
    torch._dynamo.reset()
    expect_error(Exception, ("is strict", f"`window: {window}`"), lambda: dilated_compile.explain(
        WindowedAttention(window), *local, policy=_ring_policy("contiguous", strict=True)))


def wrong_stated_window_case() -> None:
    """A stated window that the shard's mask contradicts (the causal mask on a shard longer
    than it; a window of another width): an error on every rank."""
    import dilated_compile

    world, _, _ = ring_info()
    local = [shard(t, 2, "zigzag") for t in _inputs(world, 13)[:3]]
    for model, stated, fragment in (
        (WindowedAttention(N_LOCAL), 5, f"this rank's shard of {N_LOCAL} positions is the causal mask, not a window of 5"),
        (WindowedAttention(3), N_LOCAL, "its mask is a sliding window of 3"),
    ):
        torch._dynamo.reset()
        expect_error(Exception, ("ring rules target", f"states window: {stated}", fragment),
                     lambda: dilated_compile.explain(model, *local, policy=_ring_policy("zigzag", stated)))


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
        out["window-stated-shard-backend-zigzag"] = functools.partial(stated_window_case, "zigzag", "shard", True)
        out["window-stated-spans-eager-contiguous"] = functools.partial(
            stated_window_case, "contiguous", "spans", False)
        out["window-unstated-warns"] = unstated_window_case
        out["window-stated-wrong-raises"] = wrong_stated_window_case
    return out
