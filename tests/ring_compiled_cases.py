"""Ring cases of `tests/ring_worker.py` that run torch.compile: an SDPA site rewritten into a
ring by the backend (static and symbolic lengths), ring_attention inside torch.compile with the
collectives in its forward and backward graphs, and bad setups that the backend must turn into
the same error on every rank."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from dilated_compile import ring_attention
from dilated_compile.sharding import ring_info, shard

from .ring_common import (
    N_LOCAL, CaseFailure, _full_inputs, _inner_kwargs, _local_qkv, _ring_policy, _SDPA, expect_error, numeric_case,
)


# how a ring moves keys, as the site report says it (`lowering.ring.key_traffic`)
EXCHANGED, ROTATE = "only those used, exchanged", "shards rotate"
ALL_TO_ALL_CALL = "_c10d_functional.all_to_all_single.default("  # one call in a graph's code


def backend_case(
    inner: str, layout: str, is_causal: bool, setup: str = "groups", sends: bool = True,
    dtype: torch.dtype = torch.float32, n_local: int = N_LOCAL, keys: str | None = None,
    compiler: str = "inductor",
) -> None:
    """The backend rewrites an SDPA site into a ring: numerics as numeric_case and the report;
    with `compiler` Inductor, its forward and backward code issue all-to-alls exactly when the
    ring sends data. `keys`: how the report must say the site moves keys; exchanged keys take
    one all-to-all each way, a ring's backward more than one."""
    import dilated_compile
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    world, _, _ = ring_info()
    model = torch.compile(
        _SDPA(is_causal), backend="dilated",
        options={"policy": _ring_policy(inner, layout, setup), "compiler": compiler},
    )
    if compiler != "inductor":
        numeric_case(inner, layout, is_causal, dtype, setup, n_local, run=model)
        _check_ring_report(dilated_compile.reports()[-1], world, inner, layout, keys)
        return
    _, codes = run_and_get_code(numeric_case, inner, layout, is_causal, dtype, setup, n_local, run=model)
    if len(codes) != 2:
        raise CaseFailure(f"expected Inductor code for a forward and a backward graph, got {len(codes)}")
    for which, code in zip(("forward", "backward"), codes):
        for op in ("_c10d_functional.all_to_all_single", "_c10d_functional.wait_tensor"):
            if (op in code) != sends:
                raise CaseFailure(f"{which} code {'lacks' if sends else 'has'} {op}:\n{code[-3000:]}")
    report = dilated_compile.reports()[-1]
    _check_ring_report(report, world, inner, layout, keys)
    if keys is not None:
        calls = [code.count(ALL_TO_ALL_CALL) for code in codes]
        if (calls == [1, 1]) != (keys == EXCHANGED):
            raise CaseFailure(f"keys {keys!r}, but all-to-alls (forward, backward): {calls}")
    if inner == "dense" and sends:  # the backward's first transfer overlaps an attention call
        call = codes[1][codes[1].index("def call("):]
        send = call.find(ALL_TO_ALL_CALL)
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
# compiled: the collectives are in the forward and backward graphs


def _check_ring_report(report, world: int, inner: str, layout: str, keys: str | None) -> None:
    """The site report says the ring, its inner attention and how it moves keys; the rewritten
    graph calls the ring; the report shows the ring's Inductor setting."""
    site = report.sites[0]
    want = f"ring {layout} over {world} ranks (world), inner {inner}"
    if site.status != "rewritten" or not site.attention.startswith(want):
        raise CaseFailure(f"site report: {site.status} {site.attention!r} {site.reason!r}, want {want!r}")
    if keys is not None and f"; keys: {keys}" not in site.attention:
        raise CaseFailure(f"site report: {site.attention!r}, want keys: {keys!r}")
    if "ring_attention_local" not in report.after:
        raise CaseFailure("rewritten graph does not call ring_attention_local")
    if "inductor: reorder_for_peak_memory (off" not in str(report):
        raise CaseFailure(f"the report does not show the ring's Inductor setting:\n{report}")


def _capturing_backend(graphs: list[str]):
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    def record(gm, example_inputs):
        graphs.append(gm.code)
        return make_boxed_func(gm.forward)

    return aot_autograd(fw_compiler=record, bw_compiler=record)


def compiled_case(
    layout: str, is_causal: bool, backend: str, inner: str = "dense", setup: str = "",
    dtype: torch.dtype = torch.float32, exchanged: bool = False,
) -> None:
    """ring_attention inside torch.compile: equal to eager; graphs hold the collective ops
    (`exchanged`: exactly one all-to-all in each, the exchange of the keys the blocks use)."""
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
            calls = code.count(ALL_TO_ALL_CALL)
            if exchanged and calls != 1:
                raise CaseFailure(f"keys {EXCHANGED!r}, but the {which} graph has {calls} all-to-alls")
