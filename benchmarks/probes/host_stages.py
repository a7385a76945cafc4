"""Probe: host time of each stage of the CUDA dilated op (no profiler in the way).

    python benchmarks/probes/host_stages.py [N]

Calls the stages of `dilated_forward` / `dilated_backward` on real CUDA bf16
tensors in loops of 20 without synchronising (the launch queue never fills at
these counts), so each figure is the Python + launch time of that stage. The
GPU time of the whole forward and forward+backward is printed next to it.
"""
import os
import sys

import torch
from triton.testing import do_bench

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
from dilated_compile.lowering import combine, dilated  # noqa: E402
from dilated_compile.lowering.dynamic import dilated_attention_op  # noqa: E402
from dilated_compile.lowering.kernels import block_attention, block_attention_backward  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from combine_host import host_ms  # noqa: E402

SEG = (2048, 4096, 8192, 16384, 32768)
RATES = {"groups": (1, 2, 4, 8, 16), "longnet": (1, 2, 4, 6, 12)}


def host_us(fn):
    return host_ms(fn) * 1e3


n = int(sys.argv[1]) if len(sys.argv) > 1 else 32768
h, d, scale = 16, 128, 128**-0.5
q, k, v = (torch.randn(1, n, h, d, device="cuda", dtype=torch.bfloat16).transpose(1, 2) for _ in range(3))
for split, rates in RATES.items():
    plan = dilated.plan_for(q, SEG, rates, split)
    qs, ks, vs = dilated.gather_blocks(plan, (q, k, v))
    res = [block_attention(a, b, c, is_causal=False, scale=scale, direct=True) for a, b, c in zip(qs, ks, vs)]
    out, lse = combine.merge(plan, [r.out for r in res], [r.lse for r in res], q)
    dout = torch.randn_like(out)
    douts, outs, lses = combine.backward_blocks(plan, dout, out, lse, qs)
    grads = [
        block_attention_backward(g, a, b, c, o, l, is_causal=False, scale=scale, direct=True)
        for g, a, b, c, o, l in zip(douts, qs, ks, vs, outs, lses)
    ]
    args = (list(SEG), list(rates), split, False, scale, 0)
    stages = {
        "plan_for": lambda: dilated.plan_for(q, SEG, rates, split),
        "gather_blocks (q, k, v)": lambda: dilated.gather_blocks(plan, (q, k, v)),
        f"block_attention x{len(qs)}": lambda: [
            block_attention(a, b, c, is_causal=False, scale=scale, direct=True) for a, b, c in zip(qs, ks, vs)
        ],
        "combine.merge": lambda: combine.merge(plan, [r.out for r in res], [r.lse for r in res], q),
        "dilated_forward": lambda: dilated.dilated_forward(plan, False, scale, q, k, v),
        "op forward (no grad)": lambda: dilated_attention_op(q, k, v, *args),
        "combine.backward_blocks": lambda: combine.backward_blocks(plan, dout, out, lse, qs),
        f"block_attention_backward x{len(qs)}": lambda: [
            block_attention_backward(g, a, b, c, o, l, is_causal=False, scale=scale, direct=True)
            for g, a, b, c, o, l in zip(douts, qs, ks, vs, outs, lses)
        ],
        "combine.spread_sum x3": lambda: [
            combine.spread_sum(plan, g, x) for g, x in zip(zip(*grads), (q, k, v))
        ],
        "dilated_backward": lambda: dilated.dilated_backward(plan, False, scale, q, k, v, out, lse, dout),
    }
    with torch.no_grad():
        gpu_fwd = do_bench(lambda: dilated.dilated_forward(plan, False, scale, q, k, v), return_mode="median")
        gpu_bwd = do_bench(
            lambda: dilated.dilated_backward(plan, False, scale, q, k, v, out, lse, dout), return_mode="median"
        )
        print(f"N={n} {split}: {len(plan.calls)} calls; GPU forward {gpu_fwd * 1e3:.0f} us, backward {gpu_bwd * 1e3:.0f} us")
        for name, fn in stages.items():
            print(f"  {name:34s} {host_us(fn):8.1f} us host")
