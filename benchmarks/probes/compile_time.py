"""Where the dilated backend's compile time goes: one GPT block (bench_gpt_train's) compiled
cold with each backend, forward+backward; Dynamo/Inductor phase times and kernel counts.

    python benchmarks/probes/compile_time.py --out DIR [--length 65536]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))

from bench_gpt_train import LONGNET_RATES, LONGNET_SEGMENTS, Block, clip_patterns, longnet_policy, rope_tables  # noqa: E402


def one(backend: str, head_split: str | None, n: int, width: int, heads: int, device) -> dict:
    import torch._dynamo
    import torch._inductor.metrics as metrics
    from torch._dynamo.utils import compile_times

    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="ct_inductor_")
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="ct_triton_")
    torch._dynamo.reset()
    torch._inductor.utils.clear_caches() if hasattr(torch._inductor, "utils") else None
    torch._dynamo.utils.compilation_time_metrics.clear()
    metrics.reset()
    torch.manual_seed(0)
    blk = Block(width, heads).to(device, torch.bfloat16)
    x = torch.randn(1, n, width, device=device, dtype=torch.bfloat16, requires_grad=True)
    cos, sin = rope_tables(torch.arange(n, device=device), width // heads, torch.bfloat16)
    options = None
    if backend == "dilated":
        options = {"policy": longnet_policy(*clip_patterns(LONGNET_SEGMENTS, LONGNET_RATES, n), 0,
                                            head_split=head_split)}
    c = torch.compile(blk, backend=backend, options=options, dynamic=False)
    t0 = time.perf_counter()
    c(x, cos, sin).sum().backward()
    torch.cuda.synchronize()
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(3):
        c(x, cos, sin).sum().backward()
    torch.cuda.synchronize()
    step = (time.perf_counter() - t0) / 3
    phases = {k: round(sum(v), 3) for k, v in torch._dynamo.utils.compilation_time_metrics.items()}
    top = dict(sorted(phases.items(), key=lambda kv: -kv[1])[:25])
    return {"backend": backend, "head_split": head_split, "length": n, "first_s": first, "step_s": step,
            "compile_s": first - step, "generated_kernels": metrics.generated_kernel_count,
            "top_phases_s": top}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--length", type=int, default=65536)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--heads", type=int, default=16)
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    dev = torch.device("cuda")
    rows = []
    for backend, split in (("inductor", None), ("dilated", "groups"), ("dilated", "longnet")):
        rows.append(one(backend, split, args.length, args.width, args.heads, dev))
        print(json.dumps(rows[-1], indent=1), flush=True)
        with open(os.path.join(args.out, "compile_time.json"), "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
