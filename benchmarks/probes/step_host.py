"""Probe: where the host time of a dilated forward+backward step goes (CUDA, bf16).

    python benchmarks/probes/step_host.py [N]

For `groups` and `longnet` at N tokens (B=1, H=16, D=128, the benchmark's
segments): the GPU time of one eager and one compiled step (do_bench), the
host time of each layer (median over 30 calls, GPU idle before each call, so
a call's figure is the time to issue it), the host time of each primitive
the op issues (one cuDNN call, one Triton launch, an allocation), and a
cProfile of the op's Python (`dilated_forward` + `dilated_backward` called
directly: the custom op's dispatch hides its frames from cProfile).
"""
import cProfile
import os
import pstats
import sys

import torch
from triton.testing import do_bench

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
from dilated_compile import dilated_attention  # noqa: E402
from dilated_compile.lowering import combine, dilated  # noqa: E402
from dilated_compile.lowering.kernels import _backward_impl, _forward_impl  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from op_overhead import RATES, SEG, cuda_qkv, host_us  # noqa: E402


def main():
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 32768
    h, d, scale = 16, 128, 128**-0.5
    q, k, v = cuda_qkv(n, h, d)
    print(torch.cuda.get_device_name(), torch.__version__)
    for split, rates in RATES.items():
        plan = dilated.plan_for(q, SEG, rates, split)
        public = lambda: dilated_attention(q, k, v, SEG, rates, head_split=split)  # noqa: E731
        compiled = torch.compile(public)
        with torch.no_grad():
            out, lse = dilated.dilated_forward(plan, False, scale, q, k, v)
        dout = torch.randn_like(out)

        def step(f):
            def run():
                for t in (q, k, v):
                    t.grad = None
                f().backward(dout)
            return run

        eager_step, compiled_step = step(public), step(compiled)
        compiled_step()
        print(f"\n== N={n} {split}: {len(plan.calls)} calls, parts per call "
              f"{[len(c) for c in plan.calls]}")
        print(f"  do_bench: eager step {do_bench(eager_step):.3f} ms, "
              f"compiled step {do_bench(compiled_step):.3f} ms")
        layers = {}
        with torch.no_grad():
            layers["dilated_forward"] = host_us(lambda: dilated.dilated_forward(plan, False, scale, q, k, v))
            layers["dilated_backward"] = host_us(
                lambda: dilated.dilated_backward(plan, False, scale, q, k, v, out, lse, dout))
        layers["eager forward (grad)"] = host_us(public)
        layers["eager step"] = host_us(eager_step)
        layers["compiled forward (grad)"] = host_us(compiled)
        layers["compiled step"] = host_us(compiled_step)

        # primitives
        with torch.no_grad():
            qs, ks, vs = dilated.gather_blocks(plan, (q, k, v))
            res = [_forward_impl("cudnn", a, b, c, False, scale) for a, b, c in zip(qs, ks, vs)]
            douts, outs, lses = combine.backward_blocks(plan, dout, out, lse, qs)
            grads = [_backward_impl("cudnn", g, a, b, c, o, l, False, scale)
                     for g, a, b, c, o, l in zip(douts, qs, ks, vs, outs, lses)]
            for c in range(len(qs)):
                layers[f"cuDNN forward, call {c}"] = host_us(
                    lambda c=c: _forward_impl("cudnn", qs[c], ks[c], vs[c], False, scale))
                layers[f"cuDNN backward, call {c}"] = host_us(
                    lambda c=c: _backward_impl("cudnn", douts[c], qs[c], ks[c], vs[c], outs[c], lses[c], False, scale))
            layers["gather_blocks (1 launch + views)"] = host_us(lambda: dilated.gather_blocks(plan, (q, k, v)))
            layers["combine.merge (1 launch)"] = host_us(
                lambda: combine.merge(plan, [r[0] for r in res], [r[1] for r in res], q))
            layers["combine.backward_blocks"] = host_us(lambda: combine.backward_blocks(plan, dout, out, lse, qs))
            layers["combine.spread_sum (dq)"] = host_us(lambda: combine.spread_sum(plan, [g[0] for g in grads], q))
            layers["torch.empty_like(q)"] = host_us(lambda: torch.empty_like(q))
            layers["q.new_empty 32 MiB"] = host_us(lambda: q.new_empty((n * 4, 128)))
        for name, us in layers.items():
            print(f"  {name:36s} {us:8.1f} us host")

        prof = cProfile.Profile()
        with torch.no_grad():
            for _ in range(20):
                torch.cuda.synchronize()
                prof.enable()
                dilated.dilated_forward(plan, False, scale, q, k, v)
                dilated.dilated_backward(plan, False, scale, q, k, v, out, lse, dout)
                prof.disable()
        torch.cuda.synchronize()
        print("  cProfile of 20 x (dilated_forward + dilated_backward), by own time:")
        pstats.Stats(prof, stream=sys.stdout).sort_stats("tottime").print_stats(22)


if __name__ == "__main__":
    main()
