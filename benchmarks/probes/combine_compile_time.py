"""Probe (no GPU needed): Triton compile time and load widths of the combine kernels
for one plan, compiled for sm_90 (H100/H200) on any machine with triton's ptxas.

    TRITON_CACHE_DIR=$(mktemp -d) python benchmarks/probes/combine_compile_time.py [groups|longnet] [N]

The kernels are specialised per plan (its parts are compile-time constants),
so each new sequence length compiles them again: their compile time is paid
once per length. Compiles `combine_kernel` merging (the forward's output) and
summing dq, dk and dv in one launch (the backward), with the 16-byte alignment
Triton's launcher would see, and prints seconds and the PTX's global
load/store widths.
"""
import os
import re
import sys
import time

import torch
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.compiler import compile as triton_compile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
from dilated_compile.lowering import combine, dilated  # noqa: E402
from dilated_compile.lowering import combine_kernel as ck  # noqa: E402

SEG = (2048, 4096, 8192, 16384, 32768)
RATES = {"groups": (1, 2, 4, 8, 16), "longnet": (1, 2, 4, 6, 12)}
H, D = 16, 128


def gradient_blocks(plan, n):
    """Meta tensors laid out like the cuDNN gradients of each call's blocks."""
    q = torch.empty(1, n, H, D, device="meta", dtype=torch.bfloat16).transpose(1, 2)
    out = []
    for c, parts in enumerate(plan.calls):
        if len(parts) == 1:
            out.append(torch.empty_like(dilated._part_view(q, parts[0]).flatten(0, 1)))
        else:
            out.append(q.new_empty((plan.rows_per_batch[c], 1, parts[0].m, D)))
    return out


def aligned(signature):
    """Triton's 16-byte divisibility attribute on every pointer and destination stride."""
    paths = []

    def walk(name, value, path):
        if isinstance(value, tuple):
            for j, x in enumerate(value):
                walk(name, x, path + (j,))
        elif value.startswith("*") or name.startswith("dst_s"):
            paths.append(path)

    for i, (name, value) in enumerate(signature.items()):
        walk(name, value, (i,))
    return {p: [["tt.divisibility", 16]] for p in paths}


def compiled(fn, signature, constexprs):
    names = list(signature)
    src = ASTSource(fn=fn, signature=signature, attrs=aligned(signature),
                    constexprs={(names.index(k),): v for k, v in constexprs.items()})
    t0 = time.perf_counter()
    kernel = triton_compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
    return time.perf_counter() - t0, kernel


def widths(kernel) -> dict:
    ptx = kernel.asm["ptx"]
    return {w: len(re.findall(w, ptx)) for w in ("ld.global.v4", "ld.global.b16", "st.global.v4", "st.global.b16")}


def main():
    split = sys.argv[1] if len(sys.argv) > 1 else "longnet"
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 32768
    plan = dilated.make_plan(H, n, SEG, RATES[split], split, None, 132)
    blocks = gradient_blocks(plan, n)
    parts = combine._descriptor_of(plan.calls, tuple(b.stride() for b in blocks), None, 1)
    ptrs = tuple("*bf16" for _ in blocks)
    print(f"{split} N={n}: {len(plan.calls)} calls, {len(parts) // combine.FIELDS} parts")
    common = {"PARTS": parts, "N_PARTS": len(parts) // combine.FIELDS, "HEAD_DIM": D, "BLOCK_D": D,
              "BLOCK_N": combine.BLOCK_N}
    strides = {f"dst_s{x}": "i32" for x in "bnh"}

    def signature(n_dst):  # as `combine._launch` passes them: lses are the srcs when summing
        lses = tuple("*fp32" for _ in blocks) if n_dst == 1 else ptrs
        return {"srcs": (ptrs,) * n_dst, "lses": lses, "dsts": ("*bf16",) * n_dst,
                "dst_lse": "*fp32" if n_dst == 1 else "*bf16",
                "seq_len": "i32", **strides, "lse_sb": "i32", "lse_sn": "i32", "lse_sh": "i32",
                **{k: "constexpr" for k in ("PARTS", "N_PARTS", "MERGE", "N_DST", "HEAD_DIM", "BLOCK_D",
                                            "BLOCK_N")}}

    for name, n_dst, merge in (("merge (forward: out, lse)", 1, True), ("sum dq, dk, dv (backward)", 3, False)):
        fn, sig, extra = ck.combine_kernel, signature(n_dst), {"MERGE": merge, "N_DST": n_dst}
        seconds, kernel = compiled(fn, sig, {**common, **extra})
        print(f"  {name:40s} {seconds:5.1f} s  {widths(kernel)}")


if __name__ == "__main__":
    main()
