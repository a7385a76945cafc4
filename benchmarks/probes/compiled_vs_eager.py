"""Probe: what the compiled dilated site runs on the GPU beyond the eager op.

    python benchmarks/probes/compiled_vs_eager.py [--lengths 32768 65536] [--split groups]

For each length, bf16, B=1, H=16, D=128, q/k/v stored (B, N, H, D) and seen
as (B, H, N, D) leaves that require grad (as `bench_dilated.py`): the
forward and forward+backward times of `dilated_attention` called eagerly and
of an SDPA site compiled with backend="dilated", then, for each, the GPU
kernels of a few steps (time per step by kernel name) and the strides of the
gradients autograd leaves in `.grad` (a layout other than the leaf's means a
copy by autograd's gradient accumulation).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import defaultdict

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile
from triton.testing import do_bench

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
from dilated_compile import dilated_attention  # noqa: E402

CONFIGS = {
    "groups": dict(segment_lengths=[2048, 4096, 8192, 16384, 32768], dilation_rates=[1, 2, 4, 8, 16]),
    "longnet": dict(segment_lengths=[2048, 4096, 8192, 16384, 32768], dilation_rates=[1, 2, 4, 6, 12]),
}


def kernels(step, steps: int = 5) -> list[tuple[str, float, int]]:
    """(kernel name, ms per step, launches per step) of `step`, longest first."""
    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    total: dict[str, float] = defaultdict(float)
    count: dict[str, int] = defaultdict(int)
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            total[e.name] += e.device_time / 1000
            count[e.name] += 1
    return sorted(((n, t / steps, count[n] // steps) for n, t in total.items()), key=lambda r: -r[1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", type=int, nargs="+", default=[32768, 65536])
    ap.add_argument("--split", default="groups", choices=sorted(CONFIGS))
    ap.add_argument("--top", type=int, default=14)
    args = ap.parse_args()
    h, d, dev = 16, 128, torch.device("cuda")
    cfg = CONFIGS[args.split]
    policy = {"version": 1, "rules": [{"match": "re:.*", "attention": "dilated", "head_split": args.split, **cfg}]}
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {args.split}")
    for n in args.lengths:
        q, k, v = (
            torch.randn(1, n, h, d, device=dev, dtype=torch.bfloat16).transpose(1, 2).requires_grad_()
            for _ in range(3)
        )
        g = torch.randn(1, n, h, d, device=dev, dtype=torch.bfloat16).transpose(1, 2)
        torch._dynamo.reset()
        compiled = torch.compile(
            lambda q, k, v: F.scaled_dot_product_attention(q, k, v), backend="dilated",
            options={"policy": policy},
        )
        paths = {
            "eager": lambda: dilated_attention(q, k, v, cfg["segment_lengths"], cfg["dilation_rates"], head_split=args.split),
            "compiled": lambda: compiled(q, k, v),
        }
        for name, fn in paths.items():
            def step(fn=fn):
                for t in (q, k, v):
                    t.grad = None
                fn().backward(g)

            step()
            with torch.no_grad():
                fwd = do_bench(fn, warmup=50, rep=300, return_mode="median")
            both = do_bench(step, warmup=50, rep=300, return_mode="median")
            print(f"\n== N={n} {name}: fwd {fwd:.3f} ms, fwd+bwd {both:.3f} ms; "
                  f"grad strides q {tuple(q.grad.stride())} (leaf {tuple(q.stride())}), "
                  f"k {tuple(k.grad.stride())}, v {tuple(v.grad.stride())}")
            rows = kernels(step)
            print(f"   GPU kernel time per fwd+bwd step: {sum(t for _, t, _ in rows):.3f} ms")
            for kname, t, c in rows[: args.top]:
                print(f"   {t:8.3f} ms  x{c:<3d} {kname[:110]}")
            with torch.no_grad():
                rows = kernels(fn)
            print(f"   GPU kernel time per forward: {sum(t for _, t, _ in rows):.3f} ms")
            for kname, t, c in rows[:6]:
                print(f"   {t:8.3f} ms  x{c:<3d} {kname[:110]}")


if __name__ == "__main__":
    main()
