"""Probe: which part of the traced float32 dilated attention Inductor's CUDA code gets wrong.

    DILATED_COMBINE=inductor python benchmarks/probes/fp32_inductor_bisect.py OUT_DIR

The float32 `longnet` attention compiled by Inductor on CUDA was wrong (error
0.74) while eager, `aot_eager` and Inductor's CPU code were right. This
compiles the stages of the traced path one at a time on the same real
inputs (block results from the eager run) and prints each stage's largest
difference from eager; the generated code of every stage that differs is
written to OUT_DIR. Then the whole attention under a few Inductor settings.

Found with it (commit 3afdc4e, before float32 ran the opaque op): the fault
is in `assemble` as a whole; `probes/replay/longnet_fp32.py` then found the
miscompiled kernel. Since float32 on CUDA runs the opaque op, the "whole"
cases trace the spread/merge only with ``DILATED_COMBINE=inductor``.
"""
import math
import os
import sys

import torch
from torch._inductor.utils import run_and_get_code

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
from dilated_compile import dilated_attention  # noqa: E402
from dilated_compile.lowering import dilated  # noqa: E402
from dilated_compile.lowering.kernels import block_attention  # noqa: E402

OUT = sys.argv[1] if len(sys.argv) > 1 else "."
DEV = os.environ.get("PROBE_DEVICE", "cuda")
N, H, D, SEG, RATES = 300, 5, 64, (64, 128, 256), (1, 2, 4)


def diff(a, b) -> float:
    if isinstance(a, (list, tuple)):
        return max(diff(x, y) for x, y in zip(a, b))
    a, b = a.double(), b.double()
    both_inf = torch.isinf(a) & torch.isinf(b) & (torch.sign(a) == torch.sign(b))
    d = (a - b).abs().masked_fill(both_inf, 0.0)
    return float(d.nan_to_num(nan=math.inf).max())


def check(name: str, fn, *args) -> float:
    torch._dynamo.reset()
    want = fn(*args)
    got, codes = run_and_get_code(torch.compile(fn, fullgraph=True), *args)
    err = diff(got, want)
    print(f"{name:40s} max diff {err:.3g}", flush=True)
    if err > 1e-4 and not name.startswith("setting_"):
        with open(os.path.join(OUT, f"code_{name}.py"), "w") as f:
            f.write("\n\n# ----\n\n".join(codes))
    return err


def main() -> None:
    g = torch.Generator(device=DEV).manual_seed(2)
    q, k, v = (torch.randn(2, H, N, D, device=DEV, generator=g) for _ in range(3))
    for split in ("longnet", "groups"):
        for causal in (True, False):
            print(f"== {split} causal={causal}")
            check(f"whole_{split}_{int(causal)}",
                  lambda q, k, v: dilated_attention(q, k, v, SEG, RATES, head_split=split, is_causal=causal),
                  q, k, v)
    split, causal = "longnet", True
    plan = dilated.plan_for(q, SEG, RATES, split)
    qs, ks, vs = (dilated.gather_calls(plan, x) for x in (q, k, v))
    res = [block_attention(a, b, c, is_causal=causal, scale=D**-0.5) for a, b, c in zip(qs, ks, vs)]
    outs, lses = [r.out for r in res], [r.lse for r in res]
    print("== stages (longnet, causal)")
    check("gather_calls", lambda x: dilated.gather_calls(plan, x), q)
    check("assemble", lambda o, l: dilated.assemble(plan, o, l, 2, q), outs, lses)
    check("spread_out", lambda o: list(dilated.spread_jobs(plan, o, 2, 0.0, q).values()), outs)
    check("spread_lse", lambda l: list(dilated.spread_jobs(
        plan, [t.unsqueeze(-1) for t in l], 2, -math.inf, q).values()), lses)
    pieces = dilated.spread_jobs(plan, outs, 2, 0.0, q)
    jobs = list(pieces)
    check("heads_in_order_out",
          lambda *t: dilated.heads_in_order(plan, dict(zip(jobs, t)), 0.0), *pieces.values())
    lpieces = dilated.spread_jobs(plan, [t.unsqueeze(-1) for t in lses], 2, -math.inf, q)
    check("heads_in_order_lse",
          lambda *t: dilated.heads_in_order(plan, dict(zip(jobs, t)), -math.inf), *lpieces.values())
    per_out = dilated.heads_in_order(plan, pieces, 0.0)
    per_lse = [t.squeeze(-1) for t in dilated.heads_in_order(plan, lpieces, -math.inf)]
    check("merge_by_lse", lambda o, l: dilated.merge_by_lse(o, l), per_out, per_lse)
    for i, job in enumerate(jobs):
        for p in job.parts:
            if any(p in c for c in plan.calls):
                c = next(c for c in plan.calls if p in c)
                res_c = outs[plan.calls.index(c)]
                if len(c) == 1:
                    check(f"spread_part_{i}_{p.start}", lambda y: dilated._spread(y, p, 2, 0.0), res_c)
    print("== settings (whole longnet causal)")
    import torch._inductor.config as ic

    for name, value in (("max_pointwise_cat_inputs", 1), ("max_pointwise_cat_inputs", 0),
                        ("split_reductions", False), ("triton.max_tiles", 1),
                        ("triton.prefer_nd_tiling", True), ("pattern_matcher", False),
                        ("triton.use_block_ptr", True), ("loop_ordering_after_fusion", False),
                        ("realize_opcount_threshold", 1), ("fallback_random", True)):
        try:
            with ic.patch({name: value}):
                err = check(f"setting_{name}={value}",
                            lambda q, k, v: dilated_attention(q, k, v, SEG, RATES, head_split=split,
                                                              is_causal=causal), q, k, v)
        except Exception as e:  # a setting this torch lacks
            print(f"setting {name}={value}: {type(e).__name__}: {e}")


if __name__ == "__main__":
    main()
