"""The rate of the work list's forward kernel against the attention kernels torch offers.

Where a dilated site's time goes on 8k-16k tokens is the attention kernels'
rate on short parts, not the dilation: this times non-causal forward
attention, bf16, 16 heads, head dim 128, on one GPU, GPU time only (each call
replayed in a CUDA graph), useful TFLOP/s:

- dense: one attention over all N positions, by SDPA's cuDNN and flash
  backends, by `flex_attention` (compiled) and by the work list (a dilated
  attention with one pattern, w = N, r = 1, ``DILATED_WORKLIST=on``) with its
  default blocks and others (``DILATED_WORKLIST_FWD``; with
  ``DILATED_WORKLIST_TMA=off`` it reads rows through pointers, not descriptors);
- segments: N / s independent attentions of s rows (contiguous copies for
  SDPA and flex; the work list reads them in place as the pattern w = s, r = 1).

    python benchmarks/bench_kernel_rate.py --out $OUT

Writes kernel_rate.json (a row per line of output as it is measured).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from dilated_compile import dilated_attention  # noqa: E402

HEADS, HEAD_DIM = 16, 128
# "default": the package's choice; else DILATED_WORKLIST_FWD=block_m,block_n,warps,stages[,maxnreg]
BLOCKS = ["default", "128,64,8,3", "128,64,8,2", "128,64,8,2,128", "64,64,4,3", "128,128,8,3"]


def use_blocks(blocks: str) -> None:
    """Make the work list run with `blocks` (an entry of `BLOCKS`)."""
    if blocks == "default":
        os.environ.pop("DILATED_WORKLIST_FWD", None)
    else:
        os.environ["DILATED_WORKLIST_FWD"] = blocks


def gpu_ms(fn) -> float:
    """Median GPU milliseconds of `fn` replayed in a CUDA graph."""
    from triton.testing import do_bench_cudagraph

    fn()
    torch.cuda.synchronize()
    return do_bench_cudagraph(fn, rep=50)


def main() -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import flex_attention

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=".")
    p.add_argument("--lengths", type=int, nargs="+", default=[8192, 16384])
    p.add_argument("--segments", type=int, nargs="+", default=[512, 2048])
    p.add_argument("--blocks", nargs="+", default=BLOCKS, help="work-list block settings (DILATED_WORKLIST_FWD)")
    p.add_argument("--baselines", nargs="*", default=["cudnn", "flash", "flex"], help="the kernels to time beside it")
    args = p.parse_args()
    import triton

    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "commit": os.environ.get("GIT_COMMIT"), "argv": sys.argv[1:],
              "DILATED_WORKLIST_TMA": os.environ.get("DILATED_WORKLIST_TMA", "auto"), "rows": []}
    path = os.path.join(args.out, "kernel_rate.json")

    def record(**row) -> None:
        print(json.dumps(row), flush=True)
        result["rows"].append(row)
        with open(path, "w") as f:
            json.dump(result, f, indent=1)

    flex = torch.compile(flex_attention)
    sdpa_backends = tuple((name, backend) for name, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION),
                                                                 ("flash", SDPBackend.FLASH_ATTENTION))
                          if name in args.baselines)
    os.environ["DILATED_WORKLIST"] = "on"
    for n in args.lengths:
        q, k, v = (torch.randn(1, HEADS, n, HEAD_DIM, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        flops = 4 * HEAD_DIM * HEADS * n * n
        for name, backend in sdpa_backends:
            with sdpa_kernel(backend):
                ms = gpu_ms(lambda: F.scaled_dot_product_attention(q, k, v))
            record(what=f"sdpa {name} dense", N=n, tflops=flops / ms / 1e9)
        if "flex" in args.baselines:
            record(what="flex dense", N=n, tflops=flops / gpu_ms(lambda: flex(q, k, v)) / 1e9)
        for blocks in args.blocks:
            use_blocks(blocks)
            with torch.no_grad():
                ms = gpu_ms(lambda: dilated_attention(q, k, v, [n], [1], head_split="groups"))
            record(what="worklist one pattern w=N r=1", blocks=blocks, N=n, tflops=flops / ms / 1e9)
        use_blocks("default")
        for s in args.segments:
            # (N / s, H, s, D): the segments as a batch of contiguous attentions
            qs, ks, vs = (t.reshape(1, HEADS, n // s, s, HEAD_DIM).transpose(1, 2).reshape(n // s, HEADS, s, HEAD_DIM)
                          .contiguous() for t in (q, k, v))
            flops = 4 * HEAD_DIM * HEADS * n * s
            for name, backend in sdpa_backends:
                with sdpa_kernel(backend):
                    ms = gpu_ms(lambda: F.scaled_dot_product_attention(qs, ks, vs))
                record(what=f"sdpa {name} segments", seg=s, N=n, tflops=flops / ms / 1e9)
            if "flex" in args.baselines:
                record(what="flex segments", seg=s, N=n, tflops=flops / gpu_ms(lambda: flex(qs, ks, vs)) / 1e9)
            for blocks in args.blocks:
                use_blocks(blocks)
                with torch.no_grad():
                    ms = gpu_ms(lambda: dilated_attention(q, k, v, [s], [1], head_split="groups"))
                record(what="worklist segments r=1", blocks=blocks, seg=s, N=n, tflops=flops / ms / 1e9)
            use_blocks("default")
    print("wrote", path)


if __name__ == "__main__":
    main()
