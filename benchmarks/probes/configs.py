"""Probe: Inductor settings for the gather/spread kernels, and per-part strided views."""
import os, sys, torch, torch.nn.functional as F
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
from triton.testing import do_bench
from torch.profiler import profile, ProfilerActivity
from dilated_compile.lowering.dilated import make_plan, gather_calls
from dilated_compile.lowering.kernels import block_attention
torch._dynamo.config.cache_size_limit = 64
n, h, d = 32768, 16, 128
# (B, N, H, D) storage seen as (B, H, N, D): the layout real models produce
q, k, v = (torch.randn(1, n, h, d, device="cuda", dtype=torch.bfloat16).transpose(1, 2) for _ in range(3))
def sdpa(q, k, v): return F.scaled_dot_product_attention(q, k, v)
print(f"dense BNHD {do_bench(lambda: sdpa(q, k, v), return_mode='median'):.3f} ms")
CFGS = {
    "nd_tiling+cdt": {"triton.prefer_nd_tiling": True, "coordinate_descent_tuning": True},
    "default": {},
    "nd_tiling": {"triton.prefer_nd_tiling": True},
}
seg = [2048, 4096, 8192, 16384, 32768]
for split, rates in (("groups", [1, 2, 4, 8, 16]), ("longnet", [1, 2, 4, 6, 12])):
    pol = {"version": 1, "rules": [{"match": "re:.*", "attention": "dilated", "segment_lengths": seg, "dilation_rates": rates, "head_split": split}]}
    for name, extra in CFGS.items():
        torch._dynamo.reset()
        cf = torch.compile(sdpa, backend="dilated", options={"policy": pol, **extra})
        with torch.no_grad():
            cf(q, k, v)
            t = do_bench(lambda: cf(q, k, v), return_mode="median")
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(5): cf(q, k, v)
                torch.cuda.synchronize()
        kinds = {}
        for e in prof.key_averages():
            key = "attn" if ("sdpa" in e.key or "fmha" in e.key or "flash" in e.key) else e.key[:40]
            kinds[key] = kinds.get(key, 0) + e.device_time_total / 5 / 1000
        top = sorted(kinds.items(), key=lambda x: -x[1])[:5]
        print(f"{split:8s} {name:18s} fwd {t:.3f} ms |", ", ".join(f"{a}={b:.3f}" for a, b in top))
