"""Probe: the dilated op path (CUDA, Triton combine) -- GPU time, host time, profile.

    python benchmarks/probes/combine_host.py [N ...]

For each length and head split: median GPU time of forward and forward+backward
(do_bench), the host time to issue one call (mean over 20 unsynchronised
calls), and the top entries of a profile of one forward+backward.
"""
import cProfile
import os
import pstats
import sys
import time

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile
from triton.testing import do_bench

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
from dilated_compile import dilated_attention  # noqa: E402

SEG = [2048, 4096, 8192, 16384, 32768]
RATES = {"groups": [1, 2, 4, 8, 16], "longnet": [1, 2, 4, 6, 12]}


def host_ms(fn, reps=20):
    """Milliseconds of host time per call of `fn`: `reps` calls without synchronising
    (the launch queue does not fill at these counts)."""
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) * 1e3 / reps


def main():
    for n in [int(a) for a in sys.argv[1:]] or [32768, 65536]:
        h, d = 16, 128
        q, k, v = (
            torch.randn(1, n, h, d, device="cuda", dtype=torch.bfloat16).transpose(1, 2).requires_grad_()
            for _ in range(3)
        )
        with torch.no_grad():
            print(f"N={n} dense fwd {do_bench(lambda: F.scaled_dot_product_attention(q, k, v)):.3f} ms")
        for split, rates in RATES.items():
            f = lambda: dilated_attention(q, k, v, SEG, rates, head_split=split)  # noqa: E731
            g = torch.randn_like(f())

            def step():
                for t in (q, k, v):
                    t.grad = None
                f().backward(g)

            with torch.no_grad():
                fwd = do_bench(f, return_mode="median")
                fwd_host = host_ms(f)
            fb = do_bench(step, return_mode="median")
            fb_host = host_ms(step)
            print(f"N={n} {split}: fwd {fwd:.3f} ms (host {fwd_host:.3f}), fwd+bwd {fb:.3f} ms (host {fb_host:.3f})")
            if n != int((sys.argv[1:] or [32768])[0]):
                continue  # profiles at the first length only
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                step()
                torch.cuda.synchronize()
            print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=12))
            host = cProfile.Profile()
            host.enable()
            for _ in range(10):
                step()
            host.disable()
            torch.cuda.synchronize()
            pstats.Stats(host).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
