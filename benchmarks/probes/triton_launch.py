"""Probe: the host time of one launch of our Triton combine kernel, by stage.

    python benchmarks/probes/triton_launch.py [N]

The dq spread of a `groups` plan (bf16, H=16, D=128) as `combine.spread_sum`
launches it (the kernel's signature as of the twelfth session's end; the
figures in `results/triton_launch_probe_h200_torch2.11.txt` were taken with
the one before, the same arguments without the tuples around srcs and dsts), timed whole and in the stages of Triton's `JITFunction.run`:
binding and specialising the arguments, the cache key, and the compiled
kernel's own launcher called directly. Each figure: median over 200 calls,
GPU idle before each.
"""
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
from dilated_compile.lowering import combine, dilated  # noqa: E402
from dilated_compile.lowering.kernels import _backward_impl, _forward_impl  # noqa: E402

import triton  # noqa: E402
from triton.runtime import driver  # noqa: E402
from triton.runtime.jit import compute_cache_key  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from op_overhead import SEG, cuda_qkv, host_us  # noqa: E402


def main():
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 32768
    h, d, scale = 16, 128, 128**-0.5
    q, k, v = cuda_qkv(n, h, d, requires_grad=False)
    print(torch.cuda.get_device_name(), torch.__version__, "triton", triton.__version__)
    plan = dilated.plan_for(q, SEG, (1, 2, 4, 8, 16), "groups")
    qs, ks, vs = dilated.gather_blocks(plan, (q, k, v))
    res = [_forward_impl("cudnn", a, b, c, False, scale) for a, b, c in zip(qs, ks, vs)]
    out, lse = combine.merge(plan, [r[0] for r in res], [r[1] for r in res], q)
    dout = torch.randn_like(out)
    douts, outs, lses = combine.backward_blocks(plan, dout, out, lse, qs)
    grads = [_backward_impl("cudnn", g, a, b, c, o, l, False, scale)
             for g, a, b, c, o, l in zip(douts, qs, ks, vs, outs, lses)]
    dq_blocks = tuple(g[0] for g in grads)
    dst = combine.seq_major_empty(q, q.shape, q.dtype).transpose(1, 2)
    parts = combine._descriptor(plan.calls, dq_blocks, None, 1)
    kern = combine._kernel("combine_kernel")
    grid = (combine._cdiv(n, combine.BLOCK_N), h, 1)
    args = ((dq_blocks,), dq_blocks, (dst,), dst, n, dst.stride(0), dst.stride(1), dst.stride(2), 0, 0, 0)
    kw = dict(PARTS=parts, N_PARTS=len(parts) // combine.FIELDS, MERGE=False, N_DST=1,
              HEAD_DIM=d, BLOCK_D=combine._block_d(d), BLOCK_N=combine.BLOCK_N)
    print(f"{len(parts) // combine.FIELDS} parts, PARTS holds {len(parts)} ints")

    device = driver.active.get_current_device()
    caches = kern.device_caches[device]
    kernel_cache, key_cache, binder = caches[0], caches[1], caches[4]
    full_kw = dict(kw, debug=kern.debug or triton.knobs.runtime.debug,
                   instrumentation_mode=triton.knobs.compilation.instrumentation_mode)
    compiled = kern.run(*args, grid=grid, warmup=False, **kw)
    bound, spec, opts = binder(*args, **full_kw)
    vals = tuple(bound.values())
    stream = driver.active.get_current_stream(device)

    rows = {
        "combine.spread_sum (allocation + launch)": lambda: combine.spread_sum(plan, dq_blocks, q),
        "kernel[grid](...)": lambda: kern[grid](*args, **kw),
        "  binder (bind + specialise)": lambda: binder(*args, **full_kw),
        "  compute_cache_key": lambda: compute_cache_key(key_cache, spec, opts),
        "  kernel_cache lookup": lambda: kernel_cache.get(compute_cache_key(key_cache, spec, opts)),
        "  driver get_current_stream": lambda: driver.active.get_current_stream(device),
        "  torch current_stream().cuda_stream": lambda: torch.cuda.current_stream().cuda_stream,
        "  compiled launcher, direct": lambda: compiled.run(
            grid[0], grid[1], grid[2], stream, compiled.function, compiled.packed_metadata,
            None, None, None, *vals),
        "  compiled[grid](*bound args)": lambda: compiled[grid](*vals),
    }
    for name, fn in rows.items():
        print(f"{name:44s} {host_us(fn, reps=200):8.1f} us host")


if __name__ == "__main__":
    main()
