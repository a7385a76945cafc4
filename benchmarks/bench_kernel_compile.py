"""Compile time of the dilated op's Triton kernels for a GPU, measured on any machine.

A dilated site on CUDA runs either the gathered blocks (cuDNN calls plus the
combine kernels of `lowering/common/combine.py` that gather, merge and spread
the blocks) or the work list (`lowering/dilated/worklist.py`), and Triton
compiles their kernels on a plan's first call: time the user sees in the
first training step. This runs one forward and one backward of each path on
CPU tensors with every kernel launch replaced by `triton.compile` for the
target GPU (sm_90 by default: H100 and H200), specialised as Triton's JIT
specialises it there (16-byte aligned pointers), and reports the seconds,
PTX lines and 16-byte global loads and stores of each compile. No GPU is
needed; the seconds are this host's.

    python benchmarks/bench_kernel_compile.py --out $OUT

The plans are those of `bench_gpt_train.py`'s model at each length (16
heads, head dim 128, LongNet's segments 2048..32768 and rates 1..12 cut to
the length), causal, bf16.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import tempfile
import time

os.environ["TRITON_ALWAYS_COMPILE"] = "1"  # every compile is a cold one (no cache hits)
os.environ.setdefault("TRITON_CACHE_DIR", tempfile.mkdtemp())

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import create_function_from_signature  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from gpt_model import LONGNET_RATES, LONGNET_SEGMENTS, clip_patterns  # noqa: E402
from gpt_train_results import git_commit, write_json  # noqa: E402
from dilated_compile.lowering.common import combine, combine_kernel  # noqa: E402
from dilated_compile.lowering.dilated import compute, plan as plans, worklist, worklist_blocks  # noqa: E402

HEADS, HEAD_DIM, WAVE = 16, 128, 132  # WAVE: the multiprocessors of an H100 / H200
PATHS = ("gathered blocks", "work list")


class Compiles:
    """The compiles of one run: `compile(fn, args, kwargs)` compiles a launch of the
    Triton kernel `fn` for the target and records it under the current `case`."""

    def __init__(self, arch: int):
        self.target = GPUTarget("cuda", arch, 32)
        self.backend = make_backend(self.target)
        self.case: dict = {}
        self.rows: list[dict] = []

    def compile(self, fn, args: tuple, kwargs: dict) -> None:
        binder = create_function_from_signature(fn.signature, fn.params, self.backend)
        bound, spec, options = binder(*args, **kwargs)
        options, signature, constexprs, attrs = fn._pack_args(self.backend, kwargs, bound, spec, options)
        t0 = time.perf_counter()
        compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=self.target,
                                  options=options.__dict__)
        ptx = compiled.asm["ptx"]
        row = {**self.case, "kernel": fn.__name__, "seconds": round(time.perf_counter() - t0, 3),
               "ptx_lines": len(ptx.splitlines()),
               "vector_loads": len(re.findall(r"\bld\.global(?:\.\w+)*\.v4\b", ptx)),
               "vector_stores": len(re.findall(r"\bst\.global(?:\.\w+)*\.v4\b", ptx))}
        print(json.dumps(row), flush=True)
        self.rows.append(row)


def instrument(compiles: Compiles) -> None:
    """Make the combine and work-list launchers compile their kernels for the target
    instead of launching them, with the block sizes they use on CUDA."""

    class Launcher:
        def __init__(self, name: str):
            self.fn = getattr(combine_kernel, name)

        def __getitem__(self, grid):
            return lambda *args, **kwargs: compiles.compile(self.fn, args, kwargs)

    def compile_launch(launch, inputs, args, stream) -> None:
        blocks = launch.blocks
        compiles.compile(launch.fn, (*args, *launch.tail), blocks.options)

    combine._kernel = lambda name="combine_kernel": Launcher(name)
    worklist._Launch.__call__ = compile_launch
    blocks_of = worklist_blocks._blocks_of
    worklist_blocks._blocks_of = lambda device, *rest: blocks_of("cuda", *rest)
    descriptor_blocks = worklist_blocks._descriptor_blocks  # the forward's descriptor launch as on sm_90
    worklist_blocks._descriptor_blocks = lambda device, capability, *rest: descriptor_blocks("cuda", (9, 0), *rest)


def run_plan(compiles: Compiles, n: int, split: str, causal: bool, paths: tuple[str, ...] = PATHS) -> None:
    """Compile every kernel of one forward and backward of each of `paths` at length n."""
    seg, rates = clip_patterns(LONGNET_SEGMENTS, LONGNET_RATES, n)
    plan = plans.make_plan(HEADS, n, tuple(seg), tuple(rates), split, plans.SMALL_PART_TILES, WAVE)

    def seq(dtype=torch.bfloat16, tail=(HEAD_DIM,)):
        return torch.empty(1, n, HEADS, *tail, dtype=dtype).transpose(1, 2)

    q, k, v, dout, out = (seq() for _ in range(5))
    lse = seq(torch.float32, ())
    base = {"N": n, "split": split, "causal": causal, "calls": len(plan.calls),
            "parts": sum(len(c) for c in plan.calls)}

    if "gathered blocks" in paths:
        compiles.case = {**base, "path": "gathered blocks"}
        qs, _, _ = compute.gather_blocks(plan, (q, k, v))
        combine.merge(plan, [torch.empty_like(x) for x in qs], [torch.empty(x.shape[:-1]) for x in qs], q)
        combine.backward_blocks(plan, dout, out, lse, qs)
        combine.spread_sums(plan, [[torch.empty_like(x) for x in qs] for _ in range(3)], (q, k, v))
    if "work list" in paths:
        compiles.case = {**base, "path": "work list"}
        worklist.forward(plan, causal, 0.088, q, k, v)
        worklist.backward(plan, causal, 0.088, q, k, v, out, lse, dout)


@triton.jit
def _setup_kernel(x):
    tl.store(x, 1.0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT", "out"))
    p.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768, 65536, 131072])
    p.add_argument("--splits", nargs="+", default=["groups", "longnet"])
    p.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: Hopper)")
    p.add_argument("--paths", nargs="+", choices=PATHS, default=list(PATHS))
    args = p.parse_args()
    compiles = Compiles(args.arch)
    # Triton's first compile in a process pays for its own set-up: not counted
    triton.compile(ASTSource(_setup_kernel, {"x": "*fp32"}), target=compiles.target)
    instrument(compiles)
    for n in args.lengths:
        for split in args.splits:
            run_plan(compiles, n, split, causal=True, paths=tuple(args.paths))
    totals: dict[str, float] = {}
    for r in compiles.rows:
        key = f"{r['N']} {r['split']} {r['path']}"
        totals[key] = round(totals.get(key, 0.0) + r["seconds"], 2)
    result = {
        "meta": {"target": f"sm_{args.arch}", "torch": torch.__version__, "triton": triton.__version__,
                 "host": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                 "python": platform.python_version(), "git_commit": git_commit(), "argv": sys.argv[1:]},
        "rows": compiles.rows,
        "seconds_per_plan_and_path": totals,
    }
    path = write_json(os.path.join(args.out, "kernel_compile.json"), result)
    print(json.dumps(totals, indent=1))
    print("wrote", path)


if __name__ == "__main__":
    main()
