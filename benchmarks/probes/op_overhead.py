"""Probe: host time of one call at each layer around the CUDA dilated op.

    python benchmarks/probes/op_overhead.py [N]

Each figure is the median over 30 calls of the time from the call to its
return, with the GPU idle before each call (synchronised outside the timed
span), so a full launch queue cannot stretch it and a call that blocks on the
GPU shows as host time near the GPU time. Layers, from the inside out: the
lowering's `dilated_forward` / `dilated_backward`, the custom op without
autograd, the public `dilated_attention` without and with autograd, and a
whole forward+backward step. Then a cProfile of 30 such steps (synchronised
between steps) by own time.
"""
import cProfile
import os
import pstats
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
from dilated_compile import dilated_attention  # noqa: E402
from dilated_compile.lowering import dilated  # noqa: E402

SEG = (2048, 4096, 8192, 16384, 32768)
RATES = {"groups": (1, 2, 4, 8, 16), "longnet": (1, 2, 4, 6, 12)}


def host_us(fn, reps=30) -> float:
    times = []
    fn()
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    torch.cuda.synchronize()
    return statistics.median(times) * 1e6


def cuda_qkv(n: int, h: int = 16, d: int = 128, requires_grad: bool = True) -> tuple[torch.Tensor, ...]:
    """bf16 q, k, v on the GPU stored (1, N, H, D) and seen as (1, H, N, D), as a model's
    projections give them (the probes' and the benchmark's layout)."""
    shape = (1, n, h, d)
    return tuple(
        torch.randn(shape, device="cuda", dtype=torch.bfloat16).transpose(1, 2).requires_grad_(requires_grad)
        for _ in range(3)
    )


def main():
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 32768
    h, d, scale = 16, 128, 128**-0.5
    q, k, v = cuda_qkv(n, h, d)
    op = torch.ops.dilated_compile.dilated_attention.default
    for split, rates in RATES.items():
        plan = dilated.plan_for(q, SEG, rates, split)
        with torch.no_grad():
            out, lse = dilated.dilated_forward(plan, False, scale, q, k, v)
        dout = torch.randn_like(out)
        public = lambda: dilated_attention(q, k, v, SEG, rates, head_split=split)  # noqa: E731

        def step():
            for t in (q, k, v):
                t.grad = None
            public().backward(dout)

        with torch.no_grad():
            layers = {
                "dilated_forward": host_us(lambda: dilated.dilated_forward(plan, False, scale, q, k, v)),
                "op, no grad": host_us(lambda: op(q, k, v, list(SEG), list(rates), split, False, scale, 0)),
                "dilated_attention, no grad": host_us(public),
                "dilated_backward": host_us(
                    lambda: dilated.dilated_backward(plan, False, scale, q, k, v, out, lse, dout)
                ),
            }
        layers["dilated_attention, grad (forward)"] = host_us(public)
        layers["forward+backward step"] = host_us(step)
        print(f"N={n} {split}: {len(plan.calls)} calls")
        for name, us in layers.items():
            print(f"  {name:36s} {us:8.1f} us host")
        prof = cProfile.Profile()
        for _ in range(30):
            torch.cuda.synchronize()
            prof.enable()
            step()
            prof.disable()
        torch.cuda.synchronize()
        pstats.Stats(prof).sort_stats("tottime").print_stats(18)


if __name__ == "__main__":
    main()
