"""Probe: kernel-time breakdown of compiled dilated attention, and kernel-only variants."""
import os, sys, torch, torch.nn.functional as F
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
from triton.testing import do_bench
from torch.profiler import profile, ProfilerActivity
from dilated_compile.lowering.dilated import make_plan, gather_calls
from dilated_compile.lowering.kernels import block_attention
torch._dynamo.config.cache_size_limit = 64
n, h, d = int(os.environ.get("N", 32768)), 16, 128
q, k, v = (torch.randn(1, h, n, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
dense = do_bench(lambda: F.scaled_dot_product_attention(q, k, v), return_mode="median")
print(f"dense {dense:.3f} ms")
def sdpa(q, k, v): return F.scaled_dot_product_attention(q, k, v)
for split, rates in (("groups", [1, 2, 4, 8, 16]), ("longnet", [1, 2, 4, 6, 12])):
    seg = [2048, 4096, 8192, 16384, 32768]
    pol = {"version": 1, "rules": [{"match": "re:.*", "attention": "dilated", "segment_lengths": seg, "dilation_rates": rates, "head_split": split}]}
    torch._dynamo.reset()
    cf = torch.compile(sdpa, backend="dilated", options={"policy": pol})
    with torch.no_grad():
        cf(q, k, v)
        t = do_bench(lambda: cf(q, k, v), return_mode="median")
        print(f"== {split}: compiled fwd {t:.3f} ms")
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(10): cf(q, k, v)
            torch.cuda.synchronize()
        pass
        plan = make_plan(h, n, tuple(seg), tuple(rates), split)
        blocks = [gather_calls(plan, x) for x in (q, k, v)]
        kt = do_bench(lambda: [block_attention(a, b, c, is_causal=False, scale=d**-0.5) for a, b, c in zip(*blocks)], return_mode="median")
        print(f"kernel only on pre-gathered cat blocks: {kt:.3f} ms; calls {[(len(c), c[0].m, sum(p.n_heads*p.n_segs for p in c)) for c in plan.calls]}")
        gt = do_bench(lambda: [gather_calls(plan, x) for x in (q, k, v)], return_mode="median")
        print(f"eager gather q,k,v: {gt:.3f} ms")

print("== variants")
for split, rates in (("groups", [1, 2, 4, 8, 16]), ("longnet", [1, 2, 4, 6, 12])):
    seg = [2048, 4096, 8192, 16384, 32768]
    pol = {"version": 1, "rules": [{"match": "re:.*", "attention": "dilated", "segment_lengths": seg, "dilation_rates": rates, "head_split": split}]}
    for extra in ({"max_pointwise_cat_inputs": 1}, {"max_pointwise_cat_inputs": 1, "coordinate_descent_tuning": True}):
        torch._dynamo.reset()
        cf = torch.compile(sdpa, backend="dilated", options={"policy": pol, **extra})
        with torch.no_grad():
            cf(q, k, v)
            print(split, extra, f"compiled fwd {do_bench(lambda: cf(q, k, v), return_mode='median'):.3f} ms")
        qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))
        cf(qg, kg, vg).sum().backward()
        print(split, extra, f"compiled fwdbwd {do_bench(lambda: cf(qg, kg, vg).sum().backward(), return_mode='median'):.3f} ms")
# strided views straight into cuDNN (groups, N multiple of every segment)
sizes = [4, 3, 3, 3, 3]
def views(x):
    out, h0 = [], 0
    for i, (w, r) in enumerate(zip([2048, 4096, 8192, 16384, 32768], [1, 2, 4, 8, 16])):
        s = n // w
        y = x[:, h0:h0 + sizes[i]].unflatten(2, (s, w))[:, :, :, i % r::r]
        out.append(y.reshape(1, sizes[i] * s, w // r, d)); h0 += sizes[i]
    return out
vq, vk, vv = views(q), views(k), views(v)
print("views are views:", all(t._base is not None for t in vq))
kt = do_bench(lambda: [block_attention(a, b, c, is_causal=False, scale=d**-0.5) for a, b, c in zip(vq, vk, vv)], return_mode="median")
print(f"groups: per-group cuDNN on strided views: {kt:.3f} ms")
cq, ck, cv = ([t.contiguous() for t in x] for x in (vq, vk, vv))
kt = do_bench(lambda: [block_attention(a, b, c, is_causal=False, scale=d**-0.5) for a, b, c in zip(cq, ck, cv)], return_mode="median")
print(f"groups: per-group cuDNN on contiguous copies: {kt:.3f} ms")
