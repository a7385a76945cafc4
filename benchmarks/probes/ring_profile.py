"""Probe: where a ring's forward+backward time goes, against one GPU's causal SDPA.

    torchrun --nproc-per-node 2 benchmarks/probes/ring_profile.py [--per-rank 16384 32768]
        [--inner dense|dilated_long|block_sparse] [--eager]

For each tokens-per-rank n (bf16, B=1, H=16, D=128, causal, zigzag), rank 0 prints:
the one-GPU time of the full sequence (fwd+bwd) and of the ring through the
backend; then, from a profile of the ring's steps, per kernel kind the time
per step, the NCCL kernels' time, the time the GPU runs at least one kernel,
and the time it runs compute kernels with no NCCL kernel beside them
(communication that compute does not hide shows as wall time minus busy time,
or as NCCL time outside compute), and a timeline of one ring call. With
``--inner`` other than dense it profiles that ring of `bench_ring.py
--dilated` against the same attention on one GPU instead (``--eager``: as
`ring_attention`, not through the backend).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import dilated_compile  # noqa: E402,F401
from bench_ring import CausalSDPA, inner_setups, time_ms, with_backward  # noqa: E402
from dilated_compile import shard  # noqa: E402


def kind(name: str) -> str:
    low = name.lower()
    for key, label in (("nccl", "nccl"), ("cudnn", "cudnn"), ("flash", "flash"), ("fmha", "fmha"),
                       ("triton", "triton"), ("elementwise", "aten elementwise"),
                       ("reduce", "aten reduce"), ("copy", "copy"), ("cat", "cat"), ("fill", "fill")):
        if key in low:
            return label
    return "other: " + name[:60]


def union(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, -1e30
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


def trace_events(step, steps: int) -> list[dict]:
    """The chrome-trace events of `steps` calls of `step`."""
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    path = os.path.join(tempfile.mkdtemp(), "trace.json")
    prof.export_chrome_trace(path)
    with open(path) as f:
        return [e for e in json.load(f)["traceEvents"] if "dur" in e and "ts" in e]


CPU_MARKS = ("all_to_all", "wait_tensor", "cudnn_attention", "flash_attention", "efficient_attention")


def timeline(step) -> list[str]:
    """One call of `step`: its GPU kernels (stream, start, duration) and the CPU calls that
    issue collectives and attention, in time order, times in microseconds from the first."""
    events = trace_events(step, 1)
    rows = [e for e in events if e.get("cat") == "kernel" or (
        e.get("cat") == "cpu_op" and any(m in e["name"] for m in CPU_MARKS))]
    t0 = min(e["ts"] for e in rows)
    lines = []
    for e in sorted(rows, key=lambda e: e["ts"]):
        where = f"gpu stream {e['args'].get('stream', '?')}" if e.get("cat") == "kernel" else "cpu"
        lines.append(f"   {e['ts'] - t0:9.0f} +{e['dur']:8.0f}  {where:14s} {e['name'][:70]}")
    return lines


def breakdown(step, steps: int) -> dict:
    """Per-step kernel time by kind, busy time and NCCL-only time from one profile (microseconds)."""
    events = [e for e in trace_events(step, steps) if e.get("cat") == "kernel"]
    by_kind: dict[str, float] = collections.defaultdict(float)
    by_name: dict[str, float] = collections.defaultdict(float)
    count: dict[str, int] = collections.defaultdict(int)
    spans, compute = [], []
    for e in events:
        k = kind(e["name"])
        by_kind[k] += e["dur"]
        by_name[e["name"][:90]] += e["dur"]
        count[k] += 1
        spans.append((e["ts"], e["ts"] + e["dur"]))
        if k != "nccl":
            compute.append((e["ts"], e["ts"] + e["dur"]))
    wall = max(b for _, b in spans) - min(a for a, _ in spans)
    return {
        "kinds": {k: (v / steps, count[k] // steps) for k, v in sorted(by_kind.items(), key=lambda x: -x[1])},
        "top": sorted(((v / steps, name) for name, v in by_name.items()), reverse=True)[:12],
        "busy_us": union(spans) / steps,
        "compute_busy_us": union(compute) / steps,
        "wall_us": wall / steps,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--per-rank", type=int, nargs="+", default=[16384, 32768])
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--option", nargs="*", default=[], help="backend options NAME=PYTHON_VALUE")
    p.add_argument("--inner", default="dense", choices=("dense", "dilated", "dilated_long", "block_sparse"))
    p.add_argument("--eager", action="store_true", help="ring_attention instead of the backend")
    p.add_argument("--timeline-lines", type=int, default=400)
    args = p.parse_args()
    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.cuda.set_device(rank)
    h, d = 16, 128
    policy = {"version": 1, "rules": [{"match": "**", "attention": "dense",
                                       "ring": {"layout": "zigzag"}}]}
    for n in args.per_rank:
        g = torch.Generator(device="cuda").manual_seed(0)
        full = [torch.randn(1, h, n * world, d, device="cuda", dtype=torch.bfloat16, generator=g)
                for _ in range(4)]
        single_fn, ring_fn = CausalSDPA(), None
        if args.inner != "dense":
            _, single_fn, ring_fn, rule, _ = inner_setups(n, world, h, d, 1 << 30)[args.inner]
            policy = {"version": 1, "rules": [{"match": "**", **rule, "ring": {"layout": "zigzag"}}]}
        single_in = [t.clone().requires_grad_() for t in full[:3]]
        single = with_backward(single_fn, single_in, full[3])
        local = [shard(t, 2, "zigzag").contiguous().requires_grad_() for t in full[:3]]
        torch._dynamo.reset()
        options = {"policy": policy, **{k: eval(v) for k, v in (o.split("=", 1) for o in args.option)}}
        if not args.eager:
            ring_fn = torch.compile(CausalSDPA(), backend="dilated", options=options)
        elif ring_fn is None:
            ring_fn = lambda q, k, v: dilated_compile.ring_attention(  # noqa: E731
                q, k, v, layout="zigzag", is_causal=True, check=False)
        ring = with_backward(ring_fn, local, shard(full[3], 2, "zigzag").contiguous())
        ring()
        t_single = time_ms(single, 10, 2)
        t_ring = time_ms(ring, 10, 2)
        single_b = breakdown(single, args.steps)
        dist.barrier()
        ring_b = breakdown(ring, args.steps)
        dist.barrier()
        ring_t = timeline(ring)
        if rank == 0:
            how = "eager" if args.eager else "backend"
            print(f"\n== {args.inner} ring ({how}), {n} tokens/rank, N={n * world}, W={world}: "
                  f"one GPU fwd+bwd {t_single:.3f} ms, "
                  f"ring {t_ring:.3f} ms, efficiency {t_single / world / t_ring:.3f}")
            for name, b in (("one GPU, full N", single_b), ("ring, rank 0", ring_b)):
                print(f"-- {name}: wall {b['wall_us'] / 1e3:.3f} ms, GPU busy {b['busy_us'] / 1e3:.3f} ms, "
                      f"compute kernels busy {b['compute_busy_us'] / 1e3:.3f} ms")
                for k, (us, c) in b["kinds"].items():
                    print(f"   {k:40s} {us / 1e3:8.3f} ms  x{c}")
                print("   longest kernels (ms per step):")
                for us, name in b["top"]:
                    print(f"     {us / 1e3:8.3f}  {name}")
            print("-- ring, rank 0, one forward+backward (start, duration in us):")
            print("\n".join(ring_t[: args.timeline_lines]))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
