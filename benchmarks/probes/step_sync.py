"""Probe: where a dilated forward+backward step spends host time, and whether it waits on the GPU.

    python benchmarks/probes/step_sync.py [N] [--trace DIR]

The op-overhead probe found a whole step (forward + `.backward()`) taking
about 1.2 ms more host time than its forward and `dilated_backward` together.
Here every stage is timed twice from an idle host: once with the GPU idle,
once behind a queued ~20 ms `torch.cuda._sleep`. A stage whose host time
grows by the sleep waits for the GPU somewhere inside. The step is also
timed with autograd's device threads off, through the plain
`torch.autograd.Function` path (no custom op), and compiled by the backend;
then once under `torch.cuda.set_sync_debug_mode("warn")`, printing the stack
of every synchronising call torch reports. With ``--trace DIR`` a profiler
trace of three steps is written there.
"""
import argparse
import os
import statistics
import sys
import time
import traceback
import warnings

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
from dilated_compile import dilated_attention  # noqa: E402
from dilated_compile.lowering import combine, dilated  # noqa: E402

SEG = (2048, 4096, 8192, 16384, 32768)
RATES = {"groups": (1, 2, 4, 8, 16), "longnet": (1, 2, 4, 6, 12)}
SLEEP_CYCLES = 40_000_000  # about 20 ms at 1.98 GHz


def host_us(fn, behind_sleep: bool, reps: int = 15, setup=None) -> float:
    """Median host microseconds of `fn()` (after an untimed `setup()`), started with the GPU
    idle or busy."""
    times = []
    for _ in range(reps):
        if setup is not None:
            setup()
        torch.cuda.synchronize()
        if behind_sleep:
            torch.cuda._sleep(SLEEP_CYCLES)
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    torch.cuda.synchronize()
    return statistics.median(times) * 1e6


def sleep_us() -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    torch.cuda._sleep(SLEEP_CYCLES)
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e6


def report_syncs(fn) -> None:
    """Run `fn` under torch's sync debug mode; print each synchronising call's stack."""
    seen = []

    def show(message, category, filename, lineno, file=None, line=None):
        seen.append((str(message), "".join(traceback.format_stack(limit=12)[:-1])))

    old = warnings.showwarning
    warnings.showwarning = show
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = show
            fn()
            torch.cuda.synchronize()
    finally:
        torch.cuda.set_sync_debug_mode(0)
        warnings.showwarning = old
    print(f"    sync debug mode: {len(seen)} synchronising calls")
    for message, stack in seen[:4]:
        print("    ---", message.splitlines()[0])
        print("\n".join("      " + s for s in stack.splitlines()[-12:]))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("n", nargs="?", type=int, default=32768)
    parser.add_argument("--trace", default=None)
    args = parser.parse_args()

    n, h, d = args.n, 16, 128
    scale = d**-0.5
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}, N={n}")
    print(f"queued sleep alone: {sleep_us():.0f} us")
    q, k, v = (
        torch.randn(1, n, h, d, device="cuda", dtype=torch.bfloat16).transpose(1, 2).requires_grad_()
        for _ in range(3)
    )
    for split, rates in RATES.items():
        plan = dilated.plan_for(q, SEG, rates, split)
        public = lambda: dilated_attention(q, k, v, SEG, rates, head_split=split)  # noqa: E731
        plain = lambda: dilated._DilatedAttention.apply(plan, False, scale, q, k, v)  # noqa: E731
        policy = {
            "version": 1,
            "rules": [{"match": "re:.*", "attention": "dilated", "head_split": split,
                       "segment_lengths": list(SEG), "dilation_rates": list(rates)}],
        }
        site = torch.compile(
            lambda a, b, c: F.scaled_dot_product_attention(a, b, c), backend="dilated",
            options={"policy": policy},
        )
        compiled = lambda: site(q, k, v)  # noqa: E731
        with torch.no_grad():
            out, lse = dilated.dilated_forward(plan, False, scale, q, k, v)
            blocks = dilated.gather_blocks(plan, (q, k, v))
            results = [dilated.block_attention(a, b, c, is_causal=False, scale=scale, direct=True)
                       for a, b, c in zip(*blocks)]
            outs, lses = [r.out for r in results], [r.lse for r in results]
        dout = torch.randn_like(out)

        def step_of(fwd):
            def step():
                for t in (q, k, v):
                    t.grad = None
                fwd().backward(dout)
            return step

        graph = {}

        def make_graph(fwd):
            def setup():
                for t in (q, k, v):
                    t.grad = None
                graph["out"] = fwd()
            return setup

        def backward_only():
            graph.pop("out").backward(dout)

        def no_threads_step():
            with torch.autograd.set_multithreading_enabled(False):
                step_of(public)()

        step_of(compiled)()  # compile outside the timings
        with torch.no_grad():
            stages = {
                "dilated_forward": lambda: dilated.dilated_forward(plan, False, scale, q, k, v),
                "dilated_backward": lambda: dilated.dilated_backward(plan, False, scale, q, k, v, out, lse, dout),
                "combine.merge (1 Triton launch)": lambda: combine.merge(plan, outs, lses, q),
            }
        stages_grad = {
            "public forward (grad)": public,
            "step: public": step_of(public),
            "step: public, no autograd threads": no_threads_step,
            "step: autograd.Function": step_of(plain),
            "step: compiled": step_of(compiled),
        }
        print(f"\n{split}: {len(plan.calls)} kernel calls")
        print(f"  {'stage':42s} {'GPU idle':>10s} {'GPU busy':>10s}")
        for name, fn in stages.items():
            with torch.no_grad():
                idle, busy = host_us(fn, False), host_us(fn, True)
            print(f"  {name:42s} {idle:10.0f} {busy:10.0f}")
        for name, fn in stages_grad.items():
            idle, busy = host_us(fn, False), host_us(fn, True)
            print(f"  {name:42s} {idle:10.0f} {busy:10.0f}")
        for name, fwd in (("public", public), ("compiled", compiled)):
            idle, busy = (host_us(backward_only, b, setup=make_graph(fwd)) for b in (False, True))
            print(f"  {'backward only: ' + name:42s} {idle:10.0f} {busy:10.0f}")
        print("  step: public")
        report_syncs(step_of(public))
        print("  step: compiled")
        report_syncs(step_of(compiled))
        if args.trace:
            from torch.profiler import ProfilerActivity, profile

            os.makedirs(args.trace, exist_ok=True)
            for name, fn in (("public", step_of(public)), ("compiled", step_of(compiled))):
                torch.cuda.synchronize()
                with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                    for _ in range(3):
                        fn()
                    torch.cuda.synchronize()
                path = os.path.join(args.trace, f"step_{split}_{name}_{n}.json")
                prof.export_chrome_trace(path)
                print(f"  trace: {path}")
                print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


if __name__ == "__main__":
    main()
