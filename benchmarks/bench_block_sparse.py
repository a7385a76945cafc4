"""Block-sparse attention on one GPU: time against density x dense flex time.

One call runs the whole sweep and writes block_sparse.json into --out:

    python benchmarks/bench_block_sparse.py --out $OUT [--lengths 32768 131072]

For each N, pattern (local_window, global_local) and density (1/2 .. 1/64),
block size 128, bf16, B=1, H=16, D=128, non-causal, it measures in the same
run: dense SDPA, dense flex (no mask), flex with a precomputed BlockMask
(what a FlexAttention user writes), and the backend's rewrite of a plain SDPA
module. Target: backend time <= 1.25 x density x dense flex time,
forward and forward+backward. Compile time is measured separately.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import flex_attention

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from dilated_compile.lowering.block_sparse.flex import cached_block_mask  # noqa: E402
from dilated_compile.lowering.block_sparse.patterns import as_pattern, density  # noqa: E402

BLOCK = 128
DENSITIES = [1 / 2, 1 / 4, 1 / 8, 1 / 16, 1 / 32, 1 / 64]
FWD_BWD = 3.5


def bench(fn, grad_of=None) -> float:
    """Median milliseconds of fn (with its backward when grad_of is given)."""
    from triton.testing import do_bench

    if grad_of is None:
        return do_bench(fn, warmup=25, rep=200, return_mode="median")
    g = torch.randn_like(fn())

    def step():
        for t in grad_of:
            t.grad = None
        fn().backward(g)

    return do_bench(step, warmup=25, rep=200, return_mode="median")


def pattern_for(kind: str, target: float, nb: int) -> dict:
    """Pattern parameters whose density is close to `target` at nb blocks."""
    blocks = target * nb  # active key blocks per query block, on average
    if kind == "local_window":
        return {"kind": "local_window", "window": max(0, round((blocks - 1) / 2))}
    g = max(1, round(blocks / 8))
    return {"kind": "global_local", "global_blocks": g, "window": max(0, round((blocks - 2 * g - 1) / 2))}


def sdpa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v)


def timed_first_call(fn) -> float:
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def run(args) -> dict:
    dev = torch.device("cuda")
    torch._dynamo.config.cache_size_limit = 512
    h, d = args.heads, args.head_dim
    results = {
        "device": torch.cuda.get_device_name(), "torch": torch.__version__, "dtype": "bfloat16",
        "batch": 1, "heads": h, "head_dim": d, "block_size": BLOCK, "causal": False, "rows": [],
    }
    path = os.path.join(args.out, args.json_name)
    flex_c = torch.compile(flex_attention, dynamic=False)
    for n in args.lengths:
        g = torch.Generator(device=dev).manual_seed(n)
        q, k, v = (torch.randn(1, h, n, d, device=dev, dtype=torch.bfloat16, generator=g).requires_grad_() for _ in range(3))
        row = {"N": n, "patterns": []}
        with torch.no_grad():
            row["dense_sdpa_fwd_ms"] = bench(lambda: sdpa(q, k, v))
            row["dense_flex_compile_s"] = timed_first_call(lambda: flex_c(q, k, v))
            row["dense_flex_fwd_ms"] = bench(lambda: flex_c(q, k, v))
        row["dense_sdpa_fwdbwd_ms"] = bench(lambda: sdpa(q, k, v), grad_of=(q, k, v))
        row["dense_flex_fwdbwd_ms"] = bench(lambda: flex_c(q, k, v), grad_of=(q, k, v))
        print(json.dumps({k2: v2 for k2, v2 in row.items() if k2 != "patterns"}), flush=True)
        nb = -(-n // BLOCK)
        for kind in args.kinds:
            for target in args.densities:
                spec = pattern_for(kind, target, nb)
                pattern = as_pattern(spec, BLOCK)
                dens = density(pattern, BLOCK, n)
                r = {"kind": kind, "pattern": spec, "target_density": target, "density": dens}
                pairs = dens * n * n  # n is a multiple of the block size here
                flops = 4 * d * h * pairs
                mask = cached_block_mask(pattern, BLOCK, n, 1, 1, False, dev)
                user_flex = lambda: flex_c(q, k, v, block_mask=mask)  # noqa: E731
                torch._dynamo.reset()
                policy = {"version": 1, "rules": [{"match": "**", "attention": "block_sparse", "block_size": BLOCK, "pattern": spec}]}
                ours = torch.compile(sdpa, backend="dilated", options={"policy": policy})
                with torch.no_grad():
                    r["compile_fwd_s"] = timed_first_call(lambda: ours(q, k, v))
                    r["ours_fwd_ms"] = bench(lambda: ours(q, k, v))
                    r["user_flex_fwd_ms"] = bench(user_flex)
                r["compile_fwdbwd_s"] = timed_first_call(lambda: ours(q, k, v).sum().backward())
                r["ours_fwdbwd_ms"] = bench(lambda: ours(q, k, v), grad_of=(q, k, v))
                r["user_flex_fwdbwd_ms"] = bench(user_flex, grad_of=(q, k, v))
                for mode, mult in (("fwd", 1), ("fwdbwd", FWD_BWD)):
                    ideal = dens * row[f"dense_flex_{mode}_ms"]
                    r[f"ideal_{mode}_ms"] = ideal
                    r[f"ours_{mode}_over_ideal"] = r[f"ours_{mode}_ms"] / ideal
                    r[f"user_flex_{mode}_over_ideal"] = r[f"user_flex_{mode}_ms"] / ideal
                    r[f"ours_{mode}_tflops_active"] = mult * flops / r[f"ours_{mode}_ms"] / 1e9
                    r[f"ours_{mode}_speedup_vs_dense_sdpa"] = row[f"dense_sdpa_{mode}_ms"] / r[f"ours_{mode}_ms"]
                row["patterns"].append(r)
                print(json.dumps({"N": n, **{k2: (round(v2, 4) if isinstance(v2, float) else v2) for k2, v2 in r.items()}}), flush=True)
                with open(path, "w") as f:
                    json.dump({**results, "rows": results["rows"] + [row]}, f, indent=1)
        results["rows"].append(row)
        del q, k, v
        torch.cuda.empty_cache()
    with open(path, "w") as f:
        json.dump(results, f, indent=1)
    return results


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--lengths", type=int, nargs="+", default=[32768, 65536, 131072])
    p.add_argument("--kinds", nargs="+", default=["local_window", "global_local"])
    p.add_argument("--densities", type=float, nargs="+", default=DENSITIES,
                   help="nominal densities to sweep (default 1/2 .. 1/64)")
    p.add_argument("--json-name", default="block_sparse.json")
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--out", default=os.environ.get("OUT", "out"))
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    run(args)
    print("wrote", os.path.join(args.out, args.json_name))


if __name__ == "__main__":
    main()
