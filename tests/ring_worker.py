"""One rank of a multi-process ring-attention test run (gloo on CPU, or NCCL on GPUs).

    python -m tests.ring_worker --rank R --world W --store FILE --out DIR [--only NAME ...]
                                [--backend gloo|nccl]

Every rank runs every case of `cases(world)` in the same order (a case may
use collectives, so all ranks must take part in each), catching failures, and
writes ``DIR/rank<R>.json``: ``{"results": {case: null | "failure text"},
"current": case being run, "seconds": {case: run time}}``, rewritten after each case so a hang shows
where it stopped. `tests/test_ring.py` launches the ranks, bounds their run
time and turns the results into one pytest test per case.

``--backend nccl`` (`tests/test_ring_nccl.py`): rank R uses ``cuda:R`` and
every case makes its tensors there (`DEVICE`, set by `configure`); inputs
are still drawn on the CPU (the same values as on gloo) and the float64
references run on the CPU. NCCL runs more cases than gloo (`cases`): bf16
for every inner attention, layout and causality (the cuDNN/flash kernels),
a few fp16 ones and bf16 cases through the backend.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import sys
import time
import traceback
import zlib
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

from dilated_compile import dense_reference, dilated_reference, register_group, ring_attention
from dilated_compile.lowering.reference import block_sparse_reference
from dilated_compile.sharding import check_same_on_all_ranks, ring_info, shard, unshard

from .ring_window_cases import window_cases
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


# how a ring moves keys, as the site report says it (`lowering.ring.key_traffic`)
EXCHANGED, ROTATE = "only those used, exchanged", "shards rotate"


def backend_case(
    inner: str, layout: str, is_causal: bool, setup: str = "groups", sends: bool = True,
    dtype: torch.dtype = torch.float32, n_local: int = N_LOCAL, keys: str | None = None,
) -> None:
    """The backend rewrites an SDPA site into a ring: numerics as numeric_case, the report, and
    Inductor's forward and backward code issue all-to-alls exactly when the ring sends data.
    `keys`: how the report must say the site moves keys; exchanged keys take one all-to-all
    each way, a ring's backward more than one."""
    import dilated_compile
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    world, _, _ = ring_info()
    model = torch.compile(
        _SDPA(is_causal), backend="dilated", options={"policy": _ring_policy(inner, layout, setup)}
    )
    _, codes = run_and_get_code(numeric_case, inner, layout, is_causal, dtype, setup, n_local, run=model)
    if len(codes) != 2:
        raise CaseFailure(f"expected Inductor code for a forward and a backward graph, got {len(codes)}")
    for which, code in zip(("forward", "backward"), codes):
        for op in ("_c10d_functional.all_to_all_single", "_c10d_functional.wait_tensor"):
            if (op in code) != sends:
                raise CaseFailure(f"{which} code {'lacks' if sends else 'has'} {op}:\n{code[-3000:]}")
    report = dilated_compile.reports()[-1]
    site = report.sites[0]
    want = f"ring {layout} over {world} ranks (world), inner {inner}"
    if site.status != "rewritten" or not site.attention.startswith(want):
        raise CaseFailure(f"site report: {site.status} {site.attention!r} {site.reason!r}, want {want!r}")
    if keys is not None:
        if f"; keys: {keys}" not in site.attention:
            raise CaseFailure(f"site report: {site.attention!r}, want keys: {keys!r}")
        calls = [code.count("_c10d_functional.all_to_all_single.default(") for code in codes]
        if (calls == [1, 1]) != (keys == EXCHANGED):
            raise CaseFailure(f"keys {keys!r}, but all-to-alls (forward, backward): {calls}")
    if "ring_attention_local" not in report.after:
        raise CaseFailure("rewritten graph does not call ring_attention_local")
    if "inductor: reorder_for_peak_memory (off" not in str(report):
        raise CaseFailure(f"the report does not show the ring's Inductor setting:\n{report}")
    if inner == "dense" and sends:  # the backward's first transfer overlaps an attention call
        call = codes[1][codes[1].index("def call("):]
        send = call.find("_c10d_functional.all_to_all_single.default(")
        received = call.find("_c10d_functional.wait_tensor.default(", send)
        if "dilated_compile.block_attention_backward.default(" not in call[send:received]:
            code = call[max(0, send - 2000) : received + 500]
            raise CaseFailure(f"no attention between the backward's first transfer and its wait:\n{code}")


def dynamic_backend_case(
    inner: str, layout: str, is_causal: bool, setup: str, n_locals: tuple[int, ...], min_seq_len: int = 0,
) -> None:
    """torch.compile(dynamic=True) of an SDPA site under a ring rule: the site is rewritten
    into the ring custom op, one graph serves every length (no recompile), and at each
    length output and q/k/v gradients equal the float64 reference restricted to the rank.
    Below `min_seq_len` (global) the op computes what the static path's left site does:
    ordinary attention of this rank's shard."""
    import dilated_compile
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    world, _, _ = ring_info()
    policy = _ring_policy(inner, layout, setup, min_seq_len=min_seq_len)
    compiled = torch.compile(_SDPA(is_causal), backend="dilated", options={"policy": policy}, dynamic=True)

    def model(*qkv):  # q, k, v are the graph's inputs: only their length may be symbolic
        for t in qkv:
            for dim in (0, 1, 3):
                torch._dynamo.mark_static(t, dim)
        return compiled(*qkv)

    for i, n_local in enumerate(n_locals):
        with torch._dynamo.config.patch(error_on_recompile=i >= 1):
            try:
                if n_local * world >= min_seq_len:
                    numeric_case(inner, layout, is_causal, torch.float32, setup, n_local=n_local, run=model)
                else:
                    _local_sdpa_check(model, layout, is_causal, n_local)
            except CaseFailure as e:
                sites = [(s.status, s.attention, s.reason) for r in dilated_compile.reports() for s in r.sites]
                raise CaseFailure(f"global length {n_local * world}: {e}; sites: {sites}") from e
    graphs = counters["stats"]["unique_graphs"]
    if graphs != 1:
        raise CaseFailure(f"expected one graph for lengths {n_locals}, got {graphs}")
    report = dilated_compile.reports()[-1]
    site = report.sites[0]
    want = f"ring {layout} over {world} ranks (world), inner {inner}"
    if site.status != "rewritten" or not site.attention.startswith(want) or "dynamic length" not in site.attention:
        raise CaseFailure(f"site report: {site.status} {site.attention!r} {site.reason!r}, want {want!r}")
    if "dynamic_ring_attention" not in report.after:
        raise CaseFailure("rewritten graph does not call dynamic_ring_attention")


def _local_sdpa_check(model, layout: str, is_causal: bool, n_local: int) -> None:
    """Below min_seq_len: the model's output and gradients are SDPA's on the local shard."""
    world, _, _ = ring_info()
    q, k, v, dout = _full_inputs(world, n_local, torch.float32, seed=11)
    results = []
    for fn in (model, functools.partial(F.scaled_dot_product_attention, is_causal=is_causal)):
        local = [shard(t, 2, layout).clone().requires_grad_() for t in (q, k, v)]
        out = fn(*local)
        out.backward(shard(dout, 2, layout))
        results.append([out.detach()] + [t.grad for t in local])
    for name, a, b in zip(("output", "grad q", "grad k", "grad v"), *results):
        if not torch.allclose(a, b, atol=1e-5, rtol=1e-5):
            raise CaseFailure(f"below min_seq_len: {name} differs from local SDPA by {(a - b).abs().max():.3g}")


def bad_dynamic_zigzag_odd() -> None:
    """A symbolic length is checked per call: an odd zigzag shard raises on every rank, no hang."""
    torch._dynamo.reset()
    compiled = torch.compile(_SDPA(True), backend="dilated", options={"policy": _ring_policy("dense", "zigzag")},
                             dynamic=True)

    def model(*qkv):
        for t in qkv:
            for dim in (0, 1, 3):
                torch._dynamo.mark_static(t, dim)
        return compiled(*qkv)

    model(*_local_qkv(6))
    expect_error(ValueError, ("zigzag", "7 positions", "odd"), lambda: model(*_local_qkv(7)))


def bad_dynamic_lengths_differ() -> None:
    """Ranks passing different local lengths to a ring site with a symbolic length: the op
    raises ValueError on every rank, naming each rank's length, instead of hanging in the
    ring's exchanges; the group stays usable (equal lengths run again, with gradients)."""
    torch._dynamo.reset()
    world, rank, _ = ring_info()
    compiled = torch.compile(_SDPA(True), backend="dilated",
                             options={"policy": _ring_policy("dense", "contiguous")}, dynamic=True)

    def model(n_local: int):
        qkv = [t.requires_grad_() for t in _local_qkv(n_local)]
        for t in qkv:
            for dim in (0, 1, 3):
                torch._dynamo.mark_static(t, dim)
        return compiled(*qkv)

    model(6).sum().backward()  # equal lengths: the one dynamic graph, forward and backward
    lengths = [6 + 2 * r for r in range(world)]
    listing = ", ".join(f"rank {r}: {n}" for r, n in enumerate(lengths))
    expect_error(ValueError, ("differs between ranks", listing, "dilated_compile.shard"),
                 lambda: model(lengths[rank]))
    model(8).sum().backward()


def bad_backend_policy() -> None:
    """Ranks compiling different policies: an error at compile time on every rank."""
    torch._dynamo.reset()
    _, rank, _ = ring_info()
    policy = _ring_policy("dense", "zigzag", min_seq_len=rank)
    model = torch.compile(_SDPA(True), backend="dilated", options={"policy": policy})
    q, k, v = _local_qkv(N_LOCAL)
    expect_error(Exception, ("differs between ranks", "policy and ring attention sites"), lambda: model(q, k, v))


class _MaskedSDPA(torch.nn.Module):
    def forward(self, q, k, v, mask):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def bad_backend_ring_site_left() -> None:
    """A ring rule (strict: false) targets a site that cannot be rewritten (a mask that is an
    input): an error on every rank, since left as it was it would attend within the shard."""
    torch._dynamo.reset()
    model = torch.compile(_MaskedSDPA(), backend="dilated",
                          options={"policy": _ring_policy("dense", "contiguous")})
    q, k, v = _local_qkv(N_LOCAL)
    mask = torch.ones(N_LOCAL, N_LOCAL, dtype=torch.bool, device=q.device)
    expect_error(Exception, ("ring rules target", "within each rank's shard"), lambda: model(q, k, v, mask))


# ---------------------------------------------------------------------------
# attention that no ring covers while the sequence is sharded: attends within the shard


class _Block(torch.nn.Module):
    """`attn` twice with a graph break between: the block's own frames hold its attention."""

    def __init__(self):
        super().__init__()
        self.attn = _SDPA(True)

    def forward(self, x, k, v):
        x = self.attn(x, k, v)
        torch._dynamo.graph_break()
        return self.attn(x, k, v)


class _RingThenBlocks(torch.nn.Module):
    """`first` under the ring rule, then two `_Block`s: the blocks' frames hold no ring site,
    and Dynamo compiles them for `blocks.0` and runs that code for `blocks.1` too."""

    def __init__(self):
        super().__init__()
        self.first = _SDPA(True)
        self.blocks = torch.nn.ModuleList([_Block(), _Block()])

    def forward(self, q, k, v):
        x = self.first(q, k, v)  # no loop over the blocks: Dynamo runs a frame whose loop
        x = self.blocks[0](x, k, v)  # body breaks the graph eagerly, `first` included
        return self.blocks[1](x, k, v)


def _within_shard_policy(second: dict | None, strict: bool = False) -> dict:
    """A ring rule for `first`, then `second` (a rule for the other attention, or none)."""
    rules = [{"match": "first", "attention": "dense", "ring": {"layout": "contiguous"}}]
    return {"version": 1, "strict": strict, "rules": rules + ([second] if second else [])}


def _run_capturing_stderr(model, *args) -> tuple[torch.Tensor, str]:
    """model(*args) under no_grad, and what it wrote to stderr (warnings as Python shows them
    by default)."""
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err), torch.no_grad():
        out = model(*args)
    return out, err.getvalue()


def _check_within_shard_output(out: torch.Tensor, q, k, v, local_calls: int) -> None:
    """`first` is a ring over the whole sequence; the `local_calls` attention calls after it
    attend within the shard."""
    want = ring_attention(q, k, v, is_causal=True)
    for _ in range(local_calls):
        want = F.scaled_dot_product_attention(want, k, v, is_causal=True)
    if not torch.allclose(out, want, atol=1e-5, rtol=1e-5):
        raise CaseFailure(f"output differs from ring then shard-local attention by {(out - want).abs().max():.3g}")


def _block_sites(reports) -> list:
    return [s for r in reports for s in r.sites if s.module.startswith("blocks.")]


def shard_local_warned_case() -> None:
    """Attention modules that no rule matches: every rank's user sees one ShardLocalWarning
    for each (blocks.0.attn, in two compiled frames, and blocks.1.attn, which runs blocks.0's
    compiled code), naming it and the fix; they attend within the shard; the report says so."""
    import dilated_compile

    torch._dynamo.reset()
    dilated_compile.clear_reports()
    q, k, v = (shard(t, 2, "contiguous") for t in _full_inputs(ring_info()[0], N_LOCAL, torch.float32, 9)[:3])
    model = torch.compile(_RingThenBlocks(), backend="dilated", options={"policy": _within_shard_policy(None)})
    out, err = _run_capturing_stderr(model, q, k, v)
    _check_within_shard_output(out, q, k, v, local_calls=4)
    told = [line for line in err.splitlines() if "ShardLocalWarning" in line]
    for path in ("blocks.0.attn", "blocks.1.attn"):
        want = (f"attention in {path} (sdpa) attends within each rank's shard only", "no rule matches it",
                f'{{match: "{path}", attention: dense, ring: false}}')
        if sum(all(w in line for w in want) for line in told) != 1:
            raise CaseFailure(f"want one ShardLocalWarning with {want}; stderr:\n{err[-3000:]}")
    if len(told) != 2:
        raise CaseFailure(f"want two ShardLocalWarnings, got {len(told)}:\n{err[-3000:]}")
    reasons = [s.reason for s in _block_sites(dilated_compile.reports())]
    if len(reasons) != 2 or not all("attends within this rank's shard only" in r for r in reasons):
        raise CaseFailure(f"site report reasons for the blocks: {reasons}")


class _FirstThenSecond(torch.nn.Module):
    """`first` then `second`, one frame: a ring site and another site in one graph."""

    def __init__(self):
        super().__init__()
        self.first, self.second = _SDPA(True), _SDPA(True)

    def forward(self, q, k, v):
        return self.second(self.first(q, k, v), k, v)


def shard_local_declared_case() -> None:
    """`ring: false` on the second attention module: no warning; its output is attention
    within the shard; the site report says "local (declared)"."""
    import dilated_compile

    torch._dynamo.reset()
    dilated_compile.clear_reports()
    q, k, v = (shard(t, 2, "contiguous") for t in _full_inputs(ring_info()[0], N_LOCAL, torch.float32, 9)[:3])
    policy = _within_shard_policy({"match": "second", "attention": "dense", "ring": False})
    model = torch.compile(_FirstThenSecond(), backend="dilated", options={"policy": policy})
    out, err = _run_capturing_stderr(model, q, k, v)
    _check_within_shard_output(out, q, k, v, local_calls=1)
    if "ShardLocalWarning" in err or "shard only" in err:
        raise CaseFailure(f"a warning for a module declared local:\n{err[-3000:]}")
    became = [s.attention for r in dilated_compile.reports() for s in r.sites if s.module == "second"]
    if became != ["dense (unchanged); local (declared)"]:
        raise CaseFailure(f"site report for 'second': {became}")


def bad_backend_shard_local_strict() -> None:
    """Under `strict: true` a second attention whose rule has no ring is an error on every
    rank (at compile time, after the ranks agreed on the ring sites), not a hang."""
    torch._dynamo.reset()
    policy = _within_shard_policy({"match": "second", "attention": "dense"}, strict=True)
    model = torch.compile(_FirstThenSecond(), backend="dilated", options={"policy": policy})
    q, k, v = _local_qkv(N_LOCAL)
    expect_error(Exception, ("is strict", "attention in second (sdpa) attends within each rank's shard only",
                             "rules[1] 'second' has no ring", "add `ring: false` to rules[1]"),
                 lambda: model(q, k, v))


def shard_local_cases(world: int) -> dict[str, Callable[[], None]]:
    """The cases of this block for `world` ranks (four small forward graphs through Inductor,
    at world size 2 only)."""
    out: dict[str, Callable[[], None]] = {}
    if world == 2:
        out["backend-shard-local-warned"] = shard_local_warned_case
        out["backend-shard-local-declared"] = shard_local_declared_case
    if world in (2, 3):
        out["bad-backend-shard-local-strict"] = bad_backend_shard_local_strict
    return out


# ---------------------------------------------------------------------------
# compiled: the collectives are in the forward and backward graphs


def _capturing_backend(graphs: list[str]):
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    def record(gm, example_inputs):
        graphs.append(gm.code)
        return make_boxed_func(gm.forward)

    return aot_autograd(fw_compiler=record, bw_compiler=record)


def compiled_case(
    layout: str, is_causal: bool, backend: str, inner: str = "dense", setup: str = "",
    dtype: torch.dtype = torch.float32,
) -> None:
    """ring_attention inside torch.compile: equal to eager; graphs hold the collective ops."""
    torch._dynamo.reset()
    world, _, _ = ring_info()
    q, k, v, dout = _full_inputs(world, N_LOCAL, dtype, seed=7)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    graphs: list[str] = []
    fn = functools.partial(ring_attention, inner=inner, layout=layout, is_causal=is_causal,
                           **_inner_kwargs(inner, setup))
    compiled = torch.compile(fn, backend=_capturing_backend(graphs) if backend == "capture" else backend,
                             fullgraph=True)
    results = []
    for f in (fn, compiled):
        local = [shard(t, 2, layout).clone().requires_grad_() for t in (q, k, v)]
        out = f(*local)
        out.backward(shard(dout, 2, layout))
        results.append([out.detach()] + [t.grad for t in local])
    wrong = []
    for name, a, b in zip(("output", "grad q", "grad k", "grad v"), *results):
        if not torch.allclose(a, b, atol=tol, rtol=tol):
            a, b = a.float(), b.float()
            wrong.append(
                f"{name} differs from eager by {(a - b).abs().max():.3g} (max |eager| "
                f"{a.abs().max():.3g}, max |compiled| {b.abs().max():.3g}, max |compiled - 2 eager| "
                f"{(b - 2 * a).abs().max():.3g})"
            )
    if wrong:
        raise CaseFailure(f"{backend}, {dtype}: compiled " + "; ".join(wrong))
    if backend == "capture":
        if len(graphs) != 2:
            raise CaseFailure(f"expected a forward and a backward graph, got {len(graphs)}")
        for which, code in zip(("forward", "backward"), graphs):
            for op in ("_c10d_functional.all_to_all_single", "_c10d_functional.wait_tensor"):
                if op not in code:
                    raise CaseFailure(f"{which} graph lacks {op}:\n{code}")
            if "roll" in code:
                raise CaseFailure(f"{which} graph uses roll:\n{code}")


def cuda_kernels_case() -> None:
    """On CUDA the cases' dense blocks run the fused kernels (not the math fallback): cuDNN or
    flash for bfloat16 and float16, efficient for float32 (DIM is CUDA_DIM there)."""
    from dilated_compile.lowering.common.block_kernels import choose_kernel

    want = {torch.bfloat16: ("cudnn", "flash"), torch.float16: ("cudnn", "flash"), torch.float32: ("efficient",)}
    for dtype, kernels in want.items():
        q = _local_qkv(N_LOCAL, dtype)[0]
        if choose_kernel(q) not in kernels:
            raise CaseFailure(f"{dtype} blocks of shape {tuple(q.shape)} run {choose_kernel(q)!r}, want {kernels}")


# ---------------------------------------------------------------------------
# sharding helpers, groups, world-size-1 behaviour


def split_boxes_case(layout: str, is_causal: bool, setup: str) -> None:
    """numeric_case of a block-sparse ring whose shard pairs are split into several boxes
    (MAX_BOX_PAIRS lowered; only mask_mod patterns split): several masked calls per step,
    merged in the forward and summed in the backward."""
    from dilated_compile.lowering.ring import block_sparse as ring_block_sparse

    saved = ring_block_sparse.MAX_BOX_PAIRS
    ring_block_sparse.MAX_BOX_PAIRS = 4
    try:
        numeric_case("block_sparse", layout, is_causal, torch.float32, setup, n_local=12)
    finally:
        ring_block_sparse.MAX_BOX_PAIRS = saved


def first_hop_exact_case(layout: str, dtype: torch.dtype) -> None:
    """The ring backward's first gradient hop in the inputs' dtype (half the bytes of float32)
    gives the same gradients, bit for bit, as sending it in float32."""
    from dilated_compile.lowering.ring import dense as ring_dense

    world, _, _ = ring_info()
    q, k, v, dout = _full_inputs(world, 16, dtype, seed=7)
    grads = []
    for hop in ("input dtype", "float32"):
        local = [shard(t, 2, layout).clone().requires_grad_() for t in (q, k, v)]
        original = ring_dense.Schedule.first_accumulator_dtype
        if hop == "float32":
            ring_dense.Schedule.first_accumulator_dtype = lambda self, kv_dtype, acc_dtype: acc_dtype
        try:
            ring_attention(*local, layout=layout, is_causal=True).backward(shard(dout, 2, layout))
        finally:
            ring_dense.Schedule.first_accumulator_dtype = original
        grads.append([t.grad for t in local])
    for name, a, b in zip("qkv", *grads):
        if not torch.equal(a, b):
            raise CaseFailure(f"grad {name}: the {dtype} first hop differs from the float32 one by "
                              f"{(a.double() - b.double()).abs().max().item():.3g}")


def shard_roundtrip_case(layout: str) -> None:
    """unshard(shard(x)) == x along any dim; shard picks the layout's positions; grads flow."""
    world, rank, _ = ring_info()
    x = torch.arange(3 * 4 * world * 2, device=DEVICE).reshape(3, 4 * world * 2)
    pieces = shard(x, 1, layout)
    n = x.shape[1] // (2 * world)
    expected_cols = (
        list(range(rank * 2 * n, (rank + 1) * 2 * n)) if layout == "contiguous"
        else list(range(rank * n, (rank + 1) * n)) + list(range((2 * world - 1 - rank) * n, (2 * world - rank) * n))
    )
    if not torch.equal(pieces, x[:, expected_cols]):
        raise CaseFailure(f"shard picked {pieces[0].tolist()}, expected columns {expected_cols}")
    if not torch.equal(unshard(pieces, 1, layout), x):
        raise CaseFailure("unshard(shard(x)) != x")
    y = torch.randn(2, x.shape[1], 3, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    local = shard(y, -2, layout).clone().requires_grad_()
    weights = torch.arange(y.numel(), device=DEVICE).reshape(y.shape)
    (unshard(local, -2, layout) * weights).sum().backward()
    want = shard(weights.float(), -2, layout)
    if not torch.allclose(local.grad, want):
        raise CaseFailure("unshard's gradient is not this rank's shard of the output gradient")


def subgroup_case() -> None:
    """A ring over a registered subgroup (ranks 0 and 1) matches the reference there."""
    world, rank, _ = ring_info()
    pair = dist.new_group([0, 1])  # every rank must call new_group
    register_group("pair", pair)  # on every rank, with what new_group returned there
    if rank >= 2:
        try:
            ring_info("pair")
        except ValueError as e:
            if "not a member" not in str(e):
                raise CaseFailure(f"unexpected message for a non-member: {e}") from e
            return
        raise CaseFailure("ring_info('pair') on a non-member did not raise")
    if ring_info("pair")[:2] != (2, rank):
        raise CaseFailure(f"ring_info('pair') = {ring_info('pair')}")
    q, k, v, dout = _full_inputs(2, N_LOCAL, torch.float64, seed=3)
    local = [shard(t, 2, "zigzag", group="pair").clone().requires_grad_() for t in (q, k, v)]
    out = ring_attention(*local, layout="zigzag", group="pair", is_causal=True)
    out.backward(shard(dout, 2, "zigzag", group="pair"))
    ref_out, *grads = _reference("dense", "groups", True, q, k, v, dout)
    _compare("output", out, shard(ref_out, 2, "zigzag", group="pair"), 1e-12)
    for name, t, ref in zip("qkv", local, grads):
        _compare(f"grad {name}", t.grad, shard(ref, 2, "zigzag", group="pair"), 1e-12)


# ---------------------------------------------------------------------------
# the example model: a few training steps under the ring == one process


def _example_gpt(seq_len: int):
    """(module ring_gpt, ids, labels, model, an identical copy) of the example GPT at seq_len."""
    examples = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
    if examples not in sys.path:
        sys.path.insert(0, examples)
    import copy

    import ring_gpt

    torch._dynamo.reset()
    kwargs = dict(n_layer=2, n_head=4, n_embd=32, vocab=64, block_size=seq_len)
    idx, labels = ring_gpt.make_batch(2, seq_len, kwargs["vocab"], DEVICE)
    model = ring_gpt.build(kwargs, DEVICE, torch.float32)
    return ring_gpt, idx, labels, model, copy.deepcopy(model)


def _check_losses(ring_losses, single) -> None:
    for step, (a, b) in enumerate(zip(ring_losses, single)):
        if abs(a - b) > 1e-5 * abs(b):
            raise CaseFailure(f"step {step}: ring loss {a} != single-process loss {b}")


def gpt_training_case(mode: str, steps: int = 2, seq_len: int = 48) -> None:
    """examples/ring_gpt.py's sequence-parallel training against single-process training.

    mode "direct": attention calls ring_attention; "backend": the dilated
    backend rewrites the sites with examples/policies/gpt_ring.yaml.
    """
    ring_gpt, idx, labels, model, reference = _example_gpt(seq_len)
    ring_losses, logits = ring_gpt.train_ring(model, idx, labels, steps, mode)
    if not ring_gpt.check_logits(logits, reference, idx):
        raise CaseFailure("first-step logits differ from the single-process model's")
    single = ring_gpt.train_single(reference, idx, labels, steps)
    _check_losses(ring_losses, single)


def gpt_training_inner_case(inner: str, setup: str, steps: int = 2, seq_len: int = 48) -> None:
    """Training the example model through the backend with a ring rule whose inner attention
    sends data at every site (two layers: the collectives of several sites in one forward and
    one backward graph) == single-process training with the same attention, eager."""
    from dilated_compile import dilated_attention
    from dilated_compile.lowering.block_sparse.attention import block_sparse_attention

    ring_gpt, idx, labels, model, reference = _example_gpt(seq_len)
    policy = _ring_policy(inner, ring_gpt.LAYOUT, setup)
    policy["rules"][0]["match"] = "**.blocks.*.attn"
    ring_losses, _ = ring_gpt.train_ring(model, idx, labels, steps, "backend", policy=policy)
    inner_kwargs = _inner_kwargs(inner, setup)
    attend = functools.partial(
        dilated_attention if inner == "dilated" else block_sparse_attention, is_causal=True,
        **{key: (list(val) if key != "pattern" and isinstance(val, tuple) else val)
           for key, val in inner_kwargs.items()},
    )
    for module in reference.modules():  # eager, on the full sequence
        if hasattr(module, "reference"):
            module.reference = attend
    single = ring_gpt.train_single(reference, idx, labels, steps)
    _check_losses(ring_losses, single)


# ---------------------------------------------------------------------------
# bad setups: the same error on every rank, no hang


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


def bad_shard_lengths() -> None:
    _, rank, _ = ring_info()
    qkv = _local_qkv(8 if rank == 0 else 10)
    shapes = tuple(f"({BATCH}, {HEADS}, {n}, {DIM})" for n in (8, 10))
    expect_error(ValueError, ("differs between ranks", "rank 0", "rank 1", *shapes),
                 lambda: ring_attention(*qkv, is_causal=True))


def bad_zigzag_odd() -> None:
    qkv = _local_qkv(7)
    expect_error(ValueError, ("zigzag", "7 positions", "odd"), lambda: ring_attention(*qkv, layout="zigzag"))


def bad_policy_digest() -> None:
    _, rank, _ = ring_info()
    digest = "abc" if rank != 1 else "abd"
    expect_error(ValueError, ("policy digest differs between ranks", "rank 1: 'abd'", "[1]"),
                 lambda: check_same_on_all_ranks(digest, "policy digest"))


def bad_block_sparse_pattern() -> None:
    """Ranks passing different block-sparse patterns: the same error on every rank."""
    _, rank, _ = ring_info()
    qkv = _local_qkv(8)
    pattern = {"kind": "local_window", "window": 1 if rank == 0 else 2}
    expect_error(ValueError, ("differs between ranks", "local_window(window=1)", "local_window(window=2)"),
                 lambda: ring_attention(*qkv, inner="block_sparse", block_size=4, pattern=pattern))


def bad_dilated_rates() -> None:
    """Ranks passing different dilation rates: the same error on every rank, no hang."""
    _, rank, _ = ring_info()
    qkv = _local_qkv(8)
    rates = (1, 2) if rank == 0 else (1, 4)
    expect_error(ValueError, ("differs between ranks", "(1, 2)", "(1, 4)"),
                 lambda: ring_attention(*qkv, inner="dilated", segment_lengths=(4, 16), dilation_rates=rates))


def bad_group_name() -> None:
    qkv = _local_qkv(8)
    expect_error(ValueError, ("'nope'", "register_group"), lambda: ring_attention(*qkv, group="nope"))


def bad_shard_length() -> None:
    world, _, _ = ring_info()
    x = torch.zeros(2, 2 * world + 1, device=DEVICE)
    expect_error(ValueError, ("does not shard evenly", f"multiple of {2 * world}"), lambda: shard(x, 1, "zigzag"))


# ---------------------------------------------------------------------------


# names of the cases that run torch.compile (Dynamo, and Inductor for most): the slow part of a run
COMPILING_PREFIXES = ("backend-", "compiled-", "dynamic-", "bad-dynamic-", "bad-backend-", "gpt-training-backend")


def compiles(name: str) -> bool:
    """Whether case `name` compiles (tests/test_ring_nccl.py marks and launches these apart)."""
    return name.startswith(COMPILING_PREFIXES)


def cases(world: int, backend: str = "gloo") -> dict[str, Callable[[], None]]:
    """Every case run for `world` ranks over `backend`, by name (the same order on every rank).

    NCCL (CUDA tensors) runs every gloo case and more: bfloat16 for every inner attention,
    setup, layout and causality (the cuDNN/flash kernels compute the dense blocks), a few
    float16 ones, and (world size 2) bfloat16 through the backend.
    """
    gpu = backend == "nccl"
    out: dict[str, Callable[[], None]] = {}
    if gpu:
        out["cuda-kernels"] = cuda_kernels_case
    for layout in ("contiguous", "zigzag"):
        for causal in (False, True):
            tag = f"{layout}-{'causal' if causal else 'full'}"
            for dtype in (torch.float32, torch.bfloat16) if gpu else (torch.float32,):
                kw = {} if dtype == torch.float32 else {"n_local": 32}
                name = str(dtype).removeprefix("torch.")
                out[f"dense-{tag}-{name}"] = functools.partial(numeric_case, "dense", layout, causal, dtype, **kw)
                for setup in DILATED:
                    out[f"dilated-{setup}-{tag}-{name}"] = functools.partial(
                        numeric_case, "dilated", layout, causal, dtype, setup, **kw)
                for setup in BLOCK_SPARSE:
                    out[f"block-sparse-{setup}-{tag}-{name}"] = functools.partial(
                        numeric_case, "block_sparse", layout, causal, dtype, setup, **kw)
        out[f"dense-{layout}-causal-float64"] = functools.partial(
            numeric_case, "dense", layout, True, torch.float64)
        # half precision, one setup per inner kind: bfloat16 on gloo (on NCCL every setup runs
        # in bfloat16 above), float16 on NCCL
        half, setups = (torch.float16, ("longnet-long", "global")) if gpu else (
            torch.bfloat16, ("groups-long", "local"))
        name = str(half).removeprefix("torch.")
        out[f"dense-{layout}-causal-{name}"] = functools.partial(
            numeric_case, "dense", layout, True, half, n_local=32)
        for inner, setup in zip(("dilated", "block_sparse"), setups):
            out[f"{inner.replace('_', '-')}-{setup}-{layout}-causal-{name}"] = functools.partial(
                numeric_case, inner, layout, True, half, setup, n_local=32)
        out[f"shard-roundtrip-{layout}"] = functools.partial(shard_roundtrip_case, layout)
        for causal, setup in ((True, "mask-mod"), (False, "mask-mod")):
            out[f"block-sparse-split-{setup}-{layout}-{'causal' if causal else 'full'}"] = functools.partial(
                split_boxes_case, layout, causal, setup)
        out[f"first-hop-exact-{layout}-{name}"] = functools.partial(first_hop_exact_case, layout, half)
    out["dense-zigzag-causal-float64-long"] = functools.partial(
        numeric_case, "dense", "zigzag", True, torch.float64, n_local=34)
    out["gpt-training-direct"] = functools.partial(gpt_training_case, "direct")
    # Inductor compiles are the slow part of a run and do not depend on the world size (the eager
    # cases above cover every hop count): most compiled cases run on 2 ranks, a few on 3 and 4
    if world == 2:
        out["backend-dense-zigzag-causal"] = functools.partial(backend_case, "dense", "zigzag", True)
        out["backend-dilated-zigzag-causal"] = functools.partial(
            backend_case, "dilated", "zigzag", True, sends=False)  # segments inside a chunk
        out["backend-dilated-groups-long-zigzag-causal"] = functools.partial(
            backend_case, "dilated", "zigzag", True, "groups-long")
        out["backend-block-sparse-local-contiguous-causal"] = functools.partial(
            backend_case, "block_sparse", "contiguous", True, "local", keys=EXCHANGED)
    if world == 3:
        out["backend-dense-contiguous-full"] = functools.partial(backend_case, "dense", "contiguous", False)
        out["backend-block-sparse-mask-mod-zigzag-full"] = functools.partial(
            backend_case, "block_sparse", "zigzag", False, "mask-mod", keys=ROTATE)
    if world == 4:
        out["backend-dilated-longnet-contiguous-full"] = functools.partial(
            backend_case, "dilated", "contiguous", False, "longnet", sends=False,
            keys="none sent (segments inside a shard)")
        out["backend-block-sparse-global-zigzag-causal"] = functools.partial(  # one all-to-all
            backend_case, "block_sparse", "zigzag", True, "global", keys=EXCHANGED)  # each way
    if gpu and world == 2:  # cuDNN/flash inside the compiled ring; with the float32 cases above,
        # every inner attention through the backend in both layouts, causal and not
        bf16 = dict(dtype=torch.bfloat16, n_local=32)
        out["backend-dense-zigzag-causal-bfloat16"] = functools.partial(
            backend_case, "dense", "zigzag", True, **bf16)
        out["backend-dilated-groups-long-contiguous-full-bfloat16"] = functools.partial(  # longnet-long:
            backend_case, "dilated", "contiguous", False, "groups-long", **bf16)  # twice the compile time
        out["backend-block-sparse-global-zigzag-full-bfloat16"] = functools.partial(
            backend_case, "block_sparse", "zigzag", False, "global", **bf16)
    if world == 2:
        out["gpt-training-backend"] = functools.partial(gpt_training_case, "backend")
        out["gpt-training-backend-dilated-long"] = functools.partial(
            gpt_training_inner_case, "dilated", "groups-long")
    if world == 3:
        out["gpt-training-backend-block-sparse"] = functools.partial(
            gpt_training_inner_case, "block_sparse", "global")
    if world == 2:
        out["compiled-capture-zigzag-causal"] = functools.partial(compiled_case, "zigzag", True, "capture")
        out["compiled-capture-contiguous-causal"] = functools.partial(compiled_case, "contiguous", True, "capture")
        out["compiled-inductor-zigzag-causal"] = functools.partial(compiled_case, "zigzag", True, "inductor")
        out["compiled-inductor-contiguous-causal"] = functools.partial(
            compiled_case, "contiguous", True, "inductor")
    if world == 3:  # send-only ranks at several steps
        out["compiled-capture-contiguous-causal"] = functools.partial(compiled_case, "contiguous", True, "capture")
    if world == 2:
        out["compiled-capture-dilated-long-zigzag-causal"] = functools.partial(
            compiled_case, "zigzag", True, "capture", "dilated", "groups-long")
    if world == 4:
        out["compiled-capture-block-sparse-contiguous-causal"] = functools.partial(
            compiled_case, "contiguous", True, "capture", "block_sparse", "strided")
    if gpu and world == 2:  # the cuDNN/flash blocks' path (float32 runs the efficient kernel)
        out["compiled-capture-zigzag-causal-bfloat16"] = functools.partial(
            compiled_case, "zigzag", True, "capture", dtype=torch.bfloat16)
        out["compiled-inductor-zigzag-causal-bfloat16"] = functools.partial(
            compiled_case, "zigzag", True, "inductor", dtype=torch.bfloat16)
    if world >= 3:
        out["subgroup"] = subgroup_case
    # dynamic (symbolic) lengths: the ring custom op, one graph for all lengths
    if world == 2:
        out["dynamic-dense-zigzag-causal"] = functools.partial(
            dynamic_backend_case, "dense", "zigzag", True, "", (6, 10, 14), min_seq_len=16)
        out["dynamic-dilated-groups-zigzag-causal"] = functools.partial(  # segments inside a chunk
            dynamic_backend_case, "dilated", "zigzag", True, "groups", (8, 16))
        out["dynamic-dilated-groups-long-contiguous-causal"] = functools.partial(  # spanning, ragged
            dynamic_backend_case, "dilated", "contiguous", True, "groups-long", (8, 10, 13))
        out["dynamic-block-sparse-local-contiguous-causal"] = functools.partial(
            dynamic_backend_case, "block_sparse", "contiguous", True, "local", (5, 8))
    if world == 3:
        out["dynamic-dilated-longnet-long-zigzag-full"] = functools.partial(
            dynamic_backend_case, "dilated", "zigzag", False, "longnet-long", (6, 10))
    if world == 2:  # a mask_mod pattern's function travels to the op as its import path
        out["dynamic-block-sparse-mask-mod-contiguous-full"] = functools.partial(
            dynamic_backend_case, "block_sparse", "contiguous", False, "mask-mod", (8, 10))
    if world in (2, 3):
        out["bad-dynamic-zigzag-odd"] = bad_dynamic_zigzag_odd
        out["bad-dynamic-lengths-differ"] = bad_dynamic_lengths_differ
    out.update(window_cases(world, DEVICE))  # sliding-window masks (tests/ring_window_cases.py)
    for fn in (bad_shard_lengths, bad_zigzag_odd, bad_policy_digest, bad_block_sparse_pattern,
               bad_dilated_rates, bad_group_name, bad_shard_length, bad_backend_policy,
               bad_backend_ring_site_left):
        out[fn.__name__.replace("_", "-")] = fn
    out.update(shard_local_cases(world))
    return out


def configure(backend: str, rank: int) -> None:
    """Where this rank's cases run: the CPU for gloo; for NCCL cuda:<rank> (made the current
    device, as NCCL's object collectives need) with head_dim CUDA_DIM."""
    global DEVICE, DIM
    if backend == "nccl":
        DEVICE = torch.device("cuda", rank)
        torch.cuda.set_device(DEVICE)
        DIM = CUDA_DIM


def _write(path: str, state: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(state, f)
    os.replace(tmp, path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--world", type=int, required=True)
    parser.add_argument("--store", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--only", nargs="*")
    parser.add_argument("--backend", choices=("gloo", "nccl"), default="gloo")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    configure(args.backend, args.rank)
    dist.init_process_group(
        args.backend, init_method=f"file://{args.store}", rank=args.rank, world_size=args.world,
        timeout=datetime.timedelta(seconds=60),  # NCCL: its watchdog aborts the rank past this
    )
    path = os.path.join(args.out, f"rank{args.rank}.json")
    state: dict = {"results": {}, "current": None, "seconds": {}}
    for name, fn in cases(args.world, args.backend).items():
        if args.only and name not in args.only:
            continue
        state["current"] = name
        _write(path, state)
        start = time.monotonic()
        try:
            fn()
            state["results"][name] = None
        except Exception:  # noqa: BLE001 - every failure is reported to the test
            state["results"][name] = traceback.format_exc()
        state["seconds"][name] = round(time.monotonic() - start, 2)
    state["current"] = None
    _write(path, state)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
