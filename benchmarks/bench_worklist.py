"""The one-launch work-list dilated attention on one GPU: correctness, then speed.

First checks the work list (forward and gradients) against the float64
reference at small shapes and prints each max error next to the tolerance
rule's budget (with --compare-blocks, the gathered-block path's too). Then times, through the
user's path (a module calling `F.scaled_dot_product_attention` on (B, N, H, D)
tensors transposed to (B, H, N, D), compiled with ``backend="dilated"``), the
work list (``DILATED_WORKLIST=on``; ``merged``: with ``longnet`` per pattern and
merged, ``DILATED_WORKLIST_UNION=off``), the gathered-block path
(``DILATED_WORKLIST=off``) and the default (``auto``: the kernel the cost rule
of `lowering/dilated/kernel_choice.py` picks per plan; ``pointers``: the same
with the work-list forward's rows read through pointers, ``DILATED_WORKLIST_TMA=off``;
``inline``: launched by Inductor's code, ``DILATED_INLINE=on``) against dense SDPA,
forward and forward+backward, causal and not, both head splits; writes
worklist.json and worklist.png:

    python benchmarks/bench_worklist.py --out $OUT

Ratio = useful TFLOP/s / dense SDPA TFLOP/s (useful FLOPs as in
`bench_dilated.py`), from the median time of a call with its host time;
host_us = median host time of a call (of 20) with the GPU kept busy; gpu_ms = GPU time of
one call replayed in a CUDA graph (no host time).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from benchmarks.bench_dilated import FWD_BWD, _step, attended_pairs, policy_for  # noqa: E402
from benchmarks.worklist_checks import check, settings  # noqa: E402
from dilated_compile import dilated_attention  # noqa: E402

SHORT = dict(segment_lengths=[512, 1024, 2048, 4096], dilation_rates=[1, 2, 4, 8])
GROUPS_32K = dict(segment_lengths=[2048, 4096, 8192, 16384, 32768], dilation_rates=[1, 2, 4, 8, 16])
LONGNET_32K = dict(segment_lengths=[2048, 4096, 8192, 16384, 32768], dilation_rates=[1, 2, 4, 6, 12])


class Attention(torch.nn.Module):
    """What a model does: SDPA on (B, N, H, D) projections transposed to (B, H, N, D)."""

    def __init__(self, causal: bool):
        super().__init__()
        self.causal = causal

    def forward(self, q, k, v):
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=self.causal
        )
        return out.transpose(1, 2)


REP = 150  # do_bench's rep (ms); --rep sets it


def timed(fn) -> float:
    """Median milliseconds (host time included), one `do_bench`."""
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=REP, return_mode="median")


def host_us(fn, calls: int = 20) -> float:
    """Median microseconds of host time of `calls` calls, the GPU kept busy by a sleep
    kernel (a median: one call's pause, such as a garbage collection, does not count)."""
    fn()
    torch.cuda.synchronize()
    torch.cuda._sleep(int(2e9 * 0.2))  # ~0.2 s of GPU work ahead of the calls
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    torch.cuda.synchronize()
    return statistics.median(times) * 1e6


# tag -> settings of the mode; each mode compiles its own graph (the kernels are fixed when
# Inductor's graph launches them). "pointers": the default choice with the work-list
# forward's rows read through pointers, not tensor descriptors (DILATED_WORKLIST_TMA=off).
# "inline": the default choice, its work-list launches made by Inductor's generated code
# (DILATED_INLINE=on).
MODES = {
    "worklist": {"DILATED_WORKLIST": "on"},
    "merged": {"DILATED_WORKLIST": "on", "DILATED_WORKLIST_UNION": "off"},
    "blocks": {"DILATED_WORKLIST": "off"},
    "default": {"DILATED_WORKLIST": "auto"},
    "pointers": {"DILATED_WORKLIST": "auto", "DILATED_WORKLIST_TMA": "off"},
    "inline": {"DILATED_WORKLIST": "auto", "DILATED_INLINE": "on"},
}
SELECTED_MODES = tuple(MODES)  # --modes sets it
GPU_TIMED = ("worklist", "merged", "blocks")  # modes also timed in CUDA graphs


def gpu_ms(fn) -> float:
    """Median GPU milliseconds of fn replayed in a CUDA graph (no host time), or nan
    where capture fails."""
    from triton.testing import do_bench_cudagraph

    fn()
    torch.cuda.synchronize()
    try:
        return do_bench_cudagraph(fn, rep=60)
    except Exception as e:  # noqa: BLE001 - report and go on
        print("cudagraph timing failed:", type(e).__name__, str(e)[:200], flush=True)
        return float("nan")


def _site(n, split, cfg, causal, h, d) -> tuple[tuple, dict]:
    """(q, k, v) of length n, (B, N, H, D) bf16 with gradients, and the row's description:
    its pattern and the useful forward FLOPs."""
    g = torch.Generator(device="cuda").manual_seed(n)
    qkv = tuple(
        torch.randn(1, n, h, d, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_() for _ in range(3)
    )
    seg, rates = cfg["segment_lengths"], cfg["dilation_rates"]
    flops = 4 * d * attended_pairs(h, n, seg, rates, split, causal)
    return qkv, {"N": n, "split": split, "causal": causal, "segments": seg, "rates": rates, "flops_fwd": flops}


def _compiled(cfg, split, causal):
    """The user's module compiled with the dilated backend and `cfg`'s policy (Dynamo reset first)."""
    torch._dynamo.reset()
    return torch.compile(Attention(causal), backend="dilated", options={"policy": policy_for(cfg, split)})


def time_one(n, split, cfg, causal, h, d, dense) -> dict:
    from dilated_compile.lowering.dilated import kernel_choice
    from dilated_compile.lowering.dilated.plan import plan_for

    (q, k, v), r = _site(n, split, cfg, causal, h, d)
    seg, rates, flops = r["segments"], r["rates"], r["flops_fwd"]
    plan = plan_for(q.transpose(1, 2), tuple(seg), tuple(rates), split)  # the plan the op runs
    choice = kernel_choice._choose(plan, 1, d, torch.bfloat16, "cuda", causal, "auto", None)
    r["default_kernel"] = {"forward": choice.forward, "backward": choice.backward, "reason": choice.reason}
    for path in (kernel_choice.WORKLIST, kernel_choice.BLOCKS):
        for direction in ("forward", "backward"):
            r[f"estimated_ms {path} {direction}"] = kernel_choice.estimated_ms(plan, 1, d, causal, path, direction)
    for tag in SELECTED_MODES:
        with settings(**MODES[tag]):
            model = _compiled(cfg, split, causal)
            t0 = time.perf_counter()
            model(q, k, v).sum().backward()
            torch.cuda.synchronize()
            r[f"{tag}_compile_fwdbwd_s"] = time.perf_counter() - t0
            call = lambda: model(q, k, v)  # noqa: E731
            step = _step(call, (q, k, v))
            with torch.no_grad():
                r[f"{tag}_fwd_ms"] = timed(call)
                r[f"{tag}_fwd_host_us"] = host_us(call)
                if tag in GPU_TIMED:
                    r[f"{tag}_fwd_gpu_ms"] = gpu_ms(call)
            r[f"{tag}_fwdbwd_ms"] = timed(step)
            r[f"{tag}_fwdbwd_host_us"] = host_us(step)
            if tag in GPU_TIMED:
                r[f"{tag}_fwdbwd_gpu_ms"] = gpu_ms(step)
        for m, mult in (("fwd", 1), ("fwdbwd", FWD_BWD)):
            tf = mult * flops / r[f"{tag}_{m}_ms"] / 1e9
            r[f"{tag}_{m}_tflops"] = tf
            r[f"{tag}_{m}_ratio"] = tf / dense[f"{m}_tflops"]
    print(
        f"N={n} {split} causal={causal} default={choice.forward}/{choice.backward}: " + "; ".join(
            f"{tag} fwd {r[f'{tag}_fwd_ms']:.3f} ms ({r[f'{tag}_fwd_ratio']:.2f}, host {r[f'{tag}_fwd_host_us']:.0f} us"
            f"{', gpu %.3f' % r[f'{tag}_fwd_gpu_ms'] if f'{tag}_fwd_gpu_ms' in r else ''})"
            f" fwd+bwd {r[f'{tag}_fwdbwd_ms']:.3f} ms ({r[f'{tag}_fwdbwd_ratio']:.2f}, host {r[f'{tag}_fwdbwd_host_us']:.0f} us"
            f"{', gpu %.3f' % r[f'{tag}_fwdbwd_gpu_ms'] if f'{tag}_fwdbwd_gpu_ms' in r else ''})"
            for tag in SELECTED_MODES
        ),
        flush=True,
    )
    return r


def host_breakdown(n, h, d) -> dict:
    """Host microseconds per forward call at length n (groups, non-causal): the work
    list's own launches (`worklist.forward`), the custom op around them, the
    compiled site (launching the kernels itself, and through the custom op), the
    same module compiled by Inductor with dense SDPA, and the parts of the work
    list's call (`_launch_host_us`). These vary between hosts (the dense call took
    27-43 µs on one H100 host and 110 µs on another): compare them with the dense
    call of the same run."""
    from dilated_compile.lowering.dilated import worklist
    from dilated_compile.lowering.dilated.arguments import encode_parameters
    from dilated_compile.lowering.dilated.op import dilated_attention_op
    from dilated_compile.lowering.dilated.plan import plan_for

    seg, rates = tuple(SHORT["segment_lengths"]), tuple(SHORT["dilation_rates"])
    q, k, v = (torch.randn(1, n, h, d, device="cuda", dtype=torch.bfloat16).transpose(1, 2) for _ in range(3))
    plan = plan_for(q, seg, rates, "groups")
    pattern = encode_parameters(seg, rates, "groups")
    model = _compiled(SHORT, "groups", False)
    qs, ks, vs = (t.transpose(1, 2) for t in (q, k, v))
    r = {"N": n}
    with torch.no_grad():
        r["worklist_forward_host_us"] = host_us(lambda: worklist.forward(plan, False, d**-0.5, q, k, v))
        r["op_host_us"] = host_us(lambda: dilated_attention_op(q, k, v, pattern, False, d**-0.5, 0))
        r["compiled_host_us"] = host_us(lambda: model(qs, ks, vs))
        with settings(DILATED_INLINE="on"):
            inline = _compiled(SHORT, "groups", False)
            r["compiled_inline_host_us"] = host_us(lambda: inline(qs, ks, vs))
        torch._dynamo.reset()
        dense = torch.compile(Attention(False), backend="inductor")
        r["dense_compiled_host_us"] = host_us(lambda: dense(qs, ks, vs))
        r.update(_launch_host_us(plan, q, k, v))
    print(json.dumps({"host_breakdown": {key: round(val, 1) if isinstance(val, float) else val
                                          for key, val in r.items()}}), flush=True)
    return r


SITES = 8  # attention calls in the longer chain of `site_host`


class Chain(torch.nn.Module):
    """`sites` attention calls in a row, each one's output the next one's queries."""

    def __init__(self, sites: int):
        super().__init__()
        self.sites, self.attend = sites, Attention(False)

    def forward(self, q, k, v):
        for _ in range(self.sites):
            q = self.attend(q, k, v)
        return q


def _compiled_chain(sites: int, dense: bool):
    """A `Chain` compiled by Inductor with dense SDPA, or with the dilated backend and the
    8k-16k ``groups`` policy."""
    if dense:
        return torch.compile(Chain(sites), backend="inductor")
    return torch.compile(Chain(sites), backend="dilated", options={"policy": policy_for(SHORT, "groups")})


def site_host(n, h, d) -> dict:
    """Host microseconds that one more attention site adds to a compiled call, forward
    and forward+backward (groups, non-causal, length n): a chain of `SITES` sites
    against a chain of one, compiled by Inductor with dense SDPA and with the dilated
    backend (custom op, and ``DILATED_INLINE=on``). The whole call's host time, the
    second figure, also holds torch.compile's own cost per call (guards, the autograd
    wrapper), which no backend avoids."""
    (q, k, v), _ = _site(n, "groups", SHORT, False, h, d)
    r = {"N": n, "sites": SITES}
    for tag, env in (("dense", None), ("opaque", "off"), ("inline", "on")):
        for sites in (1, SITES):
            with settings(DILATED_INLINE=env or "off"):
                torch._dynamo.reset()
                model = _compiled_chain(sites, dense=env is None)
                call = lambda: model(q, k, v)  # noqa: E731
                with torch.no_grad():
                    r[f"{tag}_fwd_host_us_{sites}"] = host_us(call)
                step = _step(call, (q, k, v))
                r[f"{tag}_fwdbwd_host_us_{sites}"] = host_us(step)
        for m in ("fwd", "fwdbwd"):
            r[f"{tag}_{m}_host_us_per_site"] = (
                r[f"{tag}_{m}_host_us_{SITES}"] - r[f"{tag}_{m}_host_us_1"]) / (SITES - 1)
    del q, k, v
    torch.cuda.empty_cache()
    print(json.dumps({"site_host": {key: round(val, 1) for key, val in r.items()}}), flush=True)
    return r


def _compile_child(tag: str, sites: int, n: int, h: int, d: int) -> None:
    """In a fresh process (see `site_compile`): compile a chain of `sites` sites with
    `tag`'s backend, run its forward and backward once, print the seconds as JSON."""
    (q, k, v), _ = _site(n, "groups", SHORT, False, h, d)
    model = _compiled_chain(sites, dense=tag == "dense")
    t0 = time.perf_counter()
    model(q, k, v).sum().backward()
    torch.cuda.synchronize()
    print(json.dumps({"compile_s": time.perf_counter() - t0}), flush=True)


def site_compile(n, h, d) -> dict:
    """Cold compile seconds (forward and backward, first call) of the chains of
    `site_host` (1 and `SITES` sites, groups, length n): dense SDPA by Inductor, the
    opaque op, and ``DILATED_INLINE=on``; each in a new process with empty Inductor
    and Triton caches."""
    import subprocess
    import tempfile

    r = {"N": n, "sites": SITES}
    for tag in ("dense", "opaque", "inline"):
        for sites in (1, SITES):
            with tempfile.TemporaryDirectory() as tmp:
                env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": os.path.join(tmp, "inductor"),
                       "TRITON_CACHE_DIR": os.path.join(tmp, "triton"),
                       "DILATED_INLINE": "on" if tag == "inline" else "off"}
                done = subprocess.run(
                    [sys.executable, __file__, "--compile-child", tag, str(sites), "--lengths", str(n),
                     "--heads", str(h), "--head-dim", str(d)],
                    env=env, capture_output=True, text=True, check=True)
            r[f"{tag}_compile_s_{sites}"] = json.loads(done.stdout.strip().splitlines()[-1])["compile_s"]
    print(json.dumps({"site_compile": {key: round(val, 2) for key, val in r.items()}}), flush=True)
    return r


def _launch_host_us(plan, q, k, v) -> dict:
    """Host microseconds of the parts of `worklist.forward`'s call: finding its prepared
    call, the two output allocations, and the item launch it makes (through tensor
    descriptors where they apply: with their scratch allocation), against the same
    kernel launched through Triton's JIT launcher and the pointer-load launch."""
    from dilated_compile.lowering.dilated import worklist, worklist_blocks

    d = q.shape[-1]
    def prepared():
        return worklist._prepared(worklist._ForwardCall, plan, False, (q, k, v), worklist_blocks.FORWARD_SETTING)

    call = prepared()
    wl = call._bind(q.device)
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[:3], device=q.device, dtype=torch.float32)
    args = (q, k, v, out, lse, wl.items, d**-0.5)
    stream = torch.cuda.current_stream().cuda_stream
    attend = call._attend(q, k, v, traced=False)
    res = {"descriptors": attend is call.tma}
    try:
        res["prepared_lookup_us"] = host_us(prepared)
        res["empty_us"] = host_us(lambda: torch.empty_like(q))
        res["launch_us"] = host_us(lambda: call._attend(q, k, v, traced=False)((q, k, v), args, stream))
        res["pointer_launch_us"] = host_us(lambda: call.attend((q, k, v), args, stream))
        if attend is call.tma:
            size = 4 * 128 * wl.n_items * q.shape[0]  # four descriptors of 128 bytes per program
            res["descriptor_scratch_us"] = host_us(lambda: worklist_blocks._scratch(size, 128, stream))
        res["jit_launch_us"] = host_us(lambda: attend.fn[attend.grid](*args, *attend.tail, **attend.blocks.options))
    except Exception as e:  # noqa: BLE001 - a probe: report and go on
        print("launch probe failed:", type(e).__name__, str(e)[:300], flush=True)
    return res


def dense_row(n, causal, h, d) -> dict:
    g = torch.Generator(device="cuda").manual_seed(n)
    q, k, v = (
        torch.randn(1, n, h, d, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_() for _ in range(3)
    )
    model = Attention(causal)
    call = lambda: model(q, k, v)  # noqa: E731
    pairs = h * (n * (n + 1) // 2 if causal else n * n)
    r = {"N": n, "causal": causal}
    with torch.no_grad():
        r["fwd_ms"] = timed(call)
        r["fwd_host_us"] = host_us(call)
    step = _step(call, (q, k, v))
    r["fwdbwd_ms"] = timed(step)
    r["fwdbwd_host_us"] = host_us(step)
    r["fwd_tflops"] = 4 * d * pairs / r["fwd_ms"] / 1e9
    r["fwdbwd_tflops"] = FWD_BWD * 4 * d * pairs / r["fwdbwd_ms"] / 1e9
    print(json.dumps({"dense": {key: round(val, 3) for key, val in r.items()}}), flush=True)
    return r


TUNE_WORKLOADS = [
    # N, head split, segments, rates, causal
    (8192, "groups", SHORT["segment_lengths"], SHORT["dilation_rates"], False),
    (8192, "longnet", SHORT["segment_lengths"], SHORT["dilation_rates"], False),
    (32768, "longnet", LONGNET_32K["segment_lengths"], LONGNET_32K["dilation_rates"], False),
    (32768, "longnet", LONGNET_32K["segment_lengths"], LONGNET_32K["dilation_rates"], True),
    (16384, "groups", SHORT["segment_lengths"], SHORT["dilation_rates"], True),
]
TUNE_FORWARD = ["128,64,8,3", "128,64,8,2", "128,128,8,3", "128,64,4,3", "64,64,4,3", "64,64,4,2", "64,32,4,3"]
TUNE_BACKWARD = ["64,64,4,2", "64,32,4,3", "64,32,4,2", "128,64,8,2", "128,32,8,3", "64,64,8,3"]


def tune(h, d, lengths) -> list[dict]:
    """GPU time of eager `dilated_attention` per block configuration
    (DILATED_WORKLIST_FWD / _BWD = block_m,block_n,warps,stages), at the workloads of `lengths`."""
    rows = []
    for n, split, seg, rates, causal in (w for w in TUNE_WORKLOADS if w[0] in lengths):
        q, k, v = (
            torch.randn(1, n, h, d, device="cuda", dtype=torch.bfloat16).transpose(1, 2).requires_grad_()
            for _ in range(3)
        )
        dout = torch.randn(1, h, n, d, device="cuda", dtype=torch.bfloat16)

        def fwd():
            with torch.no_grad():
                dilated_attention(q, k, v, seg, rates, head_split=split, is_causal=causal)

        def fwdbwd():
            for t in (q, k, v):
                t.grad = None
            dilated_attention(q, k, v, seg, rates, head_split=split, is_causal=causal).backward(dout)

        for var, configs, fn in (("DILATED_WORKLIST_FWD", TUNE_FORWARD, fwd), ("DILATED_WORKLIST_BWD", TUNE_BACKWARD, fwdbwd)):
            for cfg in configs:
                os.environ[var] = cfg
                try:
                    with settings(DILATED_WORKLIST="on"):
                        ms = gpu_ms(fn)
                except Exception as e:  # noqa: BLE001 - a config that does not compile
                    print("config failed:", var, cfg, type(e).__name__, str(e)[:200], flush=True)
                    ms = float("nan")
                r = dict(N=n, split=split, causal=causal, var=var, config=cfg, gpu_ms=ms)
                print(json.dumps(r), flush=True)
                rows.append(r)
            os.environ.pop(var)
    return rows


def profile_host(h, d) -> None:
    """At 8k, groups, non-causal, with the default kernel choice: cProfile of 200 compiled
    forward calls and of 100 forward+backward steps (top functions by own time), and
    torch.profiler's table of one step's CPU and GPU time per op and kernel."""
    import cProfile
    import pstats

    n = 8192
    q, k, v = (torch.randn(1, n, h, d, device="cuda", dtype=torch.bfloat16).requires_grad_() for _ in range(3))
    model = _compiled(SHORT, "groups", False)
    call = lambda: model(q, k, v)  # noqa: E731
    step = _step(call, (q, k, v))
    for name, fn, reps in (("forward", call, 200), ("forward+backward", step, 100)):
        with torch.no_grad() if fn is call else torch.enable_grad():
            fn()
            torch.cuda.synchronize()
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(reps):
                fn()
            prof.disable()
        torch.cuda.synchronize()
        print(f"--- host profile, compiled groups {name}, {reps} calls", flush=True)
        pstats.Stats(prof).sort_stats("tottime").print_stats(30)
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            step()
        torch.cuda.synchronize()
    print("--- torch.profiler, 10 forward+backward steps, by GPU time", flush=True)
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25), flush=True)
    print("--- by CPU time", flush=True)
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=25), flush=True)


def long_rows(lengths, splits, h, d, dense_rows) -> list[dict]:
    """The default path at lengths past 128k, where dense attention is too slow to
    time: its ratio against dense SDPA's TFLOP/s at the longest timed length (same
    causality), and its time per token."""
    rows = []
    for n in lengths:
        for causal in (False, True):
            base = max((r for r in dense_rows if r["causal"] == causal), key=lambda r: r["N"])
            for split in splits:
                cfg = GROUPS_32K if split == "groups" else LONGNET_32K
                (q, k, v), r = _site(n, split, cfg, causal, h, d)
                r["dense_from_N"] = base["N"]
                flops = r["flops_fwd"]
                model = _compiled(cfg, split, causal)
                call = lambda: model(q, k, v)  # noqa: E731
                step = _step(call, (q, k, v))
                with torch.no_grad():
                    r["fwd_ms"] = timed(call)
                r["fwdbwd_ms"] = timed(step)
                for m, mult in (("fwd", 1), ("fwdbwd", FWD_BWD)):
                    r[f"{m}_ratio"] = mult * flops / r[f"{m}_ms"] / 1e9 / base[f"{m}_tflops"]
                    r[f"{m}_us_per_token"] = r[f"{m}_ms"] * 1e3 / n
                r["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
                print(json.dumps({"long": {key: (round(val, 4) if isinstance(val, float) else val)
                                           for key, val in r.items()}}), flush=True)
                rows.append(r)
                del q, k, v, model, call, step
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
    return rows


TARGETS = {"fwd": (0.70, 0.90), "fwdbwd": (0.60, 0.80)}  # below 32k tokens, from 32k


def plot(results: dict, path: str) -> None:
    """Ratio to dense SDPA per row, each path side by side, targets as dashes; rows past
    the timed dense lengths (against dense extrapolated) as the default path (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["rows"] + results.get("long", [])
    tags = [t for t in MODES if any(f"{t}_fwd_ratio" in r for r in rows)]

    def ratio(r, tag, m):
        if "dense_from_N" in r:  # a long row: the default path only
            return r[f"{m}_ratio"] if tag == "default" else 0.0
        return r.get(f"{tag}_{m}_ratio", 0.0)

    labels = [f"{r['N'] // 1024}k {r['split']}{' causal' if r['causal'] else ''}"
              f"{' (dense extrap.)' if 'dense_from_N' in r else ''}" for r in rows]
    fig, axes = plt.subplots(2, 1, figsize=(max(12, 0.5 * len(rows)), 8), sharex=True)
    width = 0.8 / len(tags)
    for ax, m, title in zip(axes, ("fwd", "fwdbwd"), ("forward", "forward+backward")):
        for i, tag in enumerate(tags):
            xs = [j + (i - (len(tags) - 1) / 2) * width for j in range(len(rows))]
            ax.bar(xs, [ratio(r, tag, m) for r in rows], width, label=tag)
        for j, r in enumerate(rows):
            target = TARGETS[m][r["N"] >= 32768]
            ax.hlines(target, j - 0.45, j + 0.45, colors="k", linestyles="dashed")
        ax.set_ylabel("useful TFLOP/s / dense SDPA")
        ax.set_title(f"{title} (dashed: target)")
        ax.legend(loc="upper left")
    axes[-1].set_xticks(range(len(rows)), labels, rotation=40, ha="right")
    fig.suptitle(f"dilated attention, {results['device']}, torch {results['torch']}, bf16, B=1 H=16 D=128")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def _triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def main():
    global REP, SELECTED_MODES
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", default=os.environ.get("OUT", "out"))
    p.add_argument("--lengths", type=int, nargs="+", default=[8192, 16384, 32768])
    p.add_argument("--long-lengths", type=int, nargs="*", default=[],
                   help="lengths past the timed dense ones (e.g. 262144 524288 1048576): default path only")
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--rep", type=int, default=150, help="do_bench rep (ms)")
    p.add_argument("--modes", nargs="+", choices=tuple(MODES), default=list(MODES),
                   help="paths to time: the work list, the work list with longnet per pattern and merged "
                        "(DILATED_WORKLIST_UNION=off), the gathered blocks, the default choice, the default "
                        "choice with the forward's rows read through pointers (DILATED_WORKLIST_TMA=off), the "
                        "default choice launched by Inductor's code (DILATED_INLINE=on)")
    p.add_argument("--skip-check", action="store_true")
    p.add_argument("--compare-blocks", action="store_true", help="checks also report the gathered-block path's errors")
    p.add_argument("--skip-timing", action="store_true")
    p.add_argument("--splits", nargs="+", default=["groups", "longnet"])
    p.add_argument("--tune", action="store_true", help="time block configurations (eager, GPU time)")
    p.add_argument("--profile-host", action="store_true", help="cProfile the compiled forward's host time")
    p.add_argument("--site-host", action="store_true",
                   help="host time one more attention site adds to a compiled call (dense, custom op, inline)")
    p.add_argument("--site-compile", action="store_true",
                   help="cold compile seconds of the --site-host chains, each in a fresh process and cache")
    p.add_argument("--compile-child", nargs=2, metavar=("BACKEND", "SITES"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.compile_child:
        _compile_child(args.compile_child[0], int(args.compile_child[1]), args.lengths[0], args.heads, args.head_dim)
        return
    REP, SELECTED_MODES = args.rep, tuple(args.modes)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "worklist.json")
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": _triton_version(),
               "commit": os.environ.get("GIT_COMMIT"), "argv": sys.argv[1:], "checks": [], "rows": [], "dense": []}
    torch._dynamo.config.cache_size_limit = 256
    t_start = time.perf_counter()
    if args.profile_host:
        profile_host(args.heads, args.head_dim)
    if args.site_host:
        results["site_host"] = site_host(args.lengths[0], args.heads, args.head_dim)
    if args.site_compile:
        results["site_compile"] = site_compile(args.lengths[0], args.heads, args.head_dim)
    if args.tune:
        results["tune"] = tune(args.heads, args.head_dim, args.lengths)
    if not args.skip_check:
        results["checks"] = check(args)
        print(f"checks: {sum(r['ok'] for r in results['checks'])}/{len(results['checks'])} ok, "
              f"{time.perf_counter() - t_start:.0f} s", flush=True)
    if not args.skip_timing:
        h, d = args.heads, args.head_dim
        results["host_breakdown"] = host_breakdown(args.lengths[0], h, d)
        for n in args.lengths:
            for causal in (False, True):
                dense = dense_row(n, causal, h, d)
                results["dense"].append(dense)
                for split in args.splits:
                    cfg = SHORT if n < 32768 else (GROUPS_32K if split == "groups" else LONGNET_32K)
                    results["rows"].append(time_one(n, split, cfg, causal, h, d, dense))
                    with open(path, "w") as f:
                        json.dump(results, f, indent=1)
            torch.cuda.empty_cache()
        if args.long_lengths:
            results["long"] = long_rows(args.long_lengths, args.splits, h, d, results["dense"])
            with open(path, "w") as f:
                json.dump(results, f, indent=1)
    results["total_s"] = time.perf_counter() - t_start
    with open(path, "w") as f:
        json.dump(results, f, indent=1)
    if results["rows"]:
        plot(results, path[: -len(".json")] + ".png")
    print("wrote", path, f"in {results['total_s']:.0f} s")


if __name__ == "__main__":
    main()
