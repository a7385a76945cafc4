"""Run time of the combine kernels on one GPU, and the first call's time (their compile).

The gathered-block path of a dilated site (cuDNN calls on views or copies of
q/k/v) puts the calls' results back into sequence order with the Triton
kernels of `lowering/common/combine.py`: `merge` (forward: the output and its
log-sum-exp), `backward_blocks` (the gathers of grad_out, out and lse into
each call's blocks) and `spread_sums` (dq, dk and dv). This times each with
`triton.testing.do_bench` at the end-to-end model's plans (16 heads, head dim
128, LongNet's segments 2048..32768 and rates 1, 2, 4, 6, 12 cut to the
length, bf16, non-causal blocks), and the first call of each in a fresh
Triton cache: the compile a cold first step pays. With ``--against COMMIT``
the same for `combine.py` and `combine_kernel.py` as they are at that commit
(loaded from git beside the current ones), outputs compared.

    python benchmarks/bench_combine.py --out $OUT [--against c1340af]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TRITON_CACHE_DIR", tempfile.mkdtemp())  # first calls compile

import torch  # noqa: E402
from triton.testing import do_bench  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from gpt_model import LONGNET_RATES, LONGNET_SEGMENTS, clip_patterns  # noqa: E402
from gpt_train_results import git_commit, write_json  # noqa: E402
from dilated_compile.lowering.common import combine  # noqa: E402
from dilated_compile.lowering.common.block_kernels import block_attention  # noqa: E402
from dilated_compile.lowering.dilated import compute  # noqa: E402
from dilated_compile.lowering.dilated.plan import plan_for  # noqa: E402

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
PACKAGE = "dilated_compile.lowering.common"


def combine_at(commit: str):
    """`combine` as it is at `commit`, with its own kernel module (both loaded from git into
    a temporary directory, as modules of the package so that their relative imports resolve)."""
    directory = tempfile.mkdtemp()

    def load(name: str, source: str):
        path = os.path.join(directory, f"{name}.py")
        with open(path, "w") as f:
            f.write(source)
        spec = importlib.util.spec_from_file_location(f"{PACKAGE}.{name}", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        return module

    def show(file: str) -> str:
        return subprocess.run(["git", "show", f"{commit}:dilated_compile/lowering/common/{file}"], cwd=REPO,
                              capture_output=True, text=True, check=True).stdout

    load("_against_combine_kernel", show("combine_kernel.py"))
    source = show("combine.py").replace("from . import combine_kernel", "from . import _against_combine_kernel as combine_kernel")
    return load("_against_combine", source)


def first_and_median(fn) -> tuple[float, float]:
    """(seconds of the first call, median ms of later ones)."""
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0, do_bench(fn, rep=60)


def run_plan(n: int, split: str, versions: dict) -> dict:
    seg, rates = clip_patterns(LONGNET_SEGMENTS, LONGNET_RATES, n)
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 16, n, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    plan = plan_for(q, tuple(seg), tuple(rates), split)
    blocks = compute.gather_blocks(plan, (q, k, v))
    results = [block_attention(*qkv, is_causal=False, scale=128 ** -0.5, direct=True) for qkv in zip(*blocks)]
    outs, lses = [r[0] for r in results], [r[1] for r in results]
    dout = torch.randn_like(q)
    row = {"N": n, "split": split, "calls": len(plan.calls), "parts": sum(map(len, plan.calls))}
    produced = {}
    for name, module in versions.items():
        ops = {  # in this order: backward_blocks gathers from merge's (out, lse)
            "merge": lambda: module.merge(plan, outs, lses, q),
            "backward_blocks": lambda: module.backward_blocks(plan, dout, *produced[name][:2], blocks[0]),
            "spread_sums": lambda: module.spread_sums(plan, [outs, outs, outs], [q, k, v]),
        }
        for op, fn in ops.items():
            first_s, ms = first_and_median(fn)
            row[f"{name} {op} ms"] = round(ms, 4)
            row[f"{name} {op} first call s"] = round(first_s, 3)
            if op == "merge":
                produced[name] = list(fn())
        produced[name] += ops["spread_sums"]()
    if len(produced) == 2:
        mine, theirs = produced.values()
        row["max abs difference"] = max((a.float() - b.float()).abs().nan_to_num().max().item() for a, b in zip(mine, theirs))
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT", "out"))
    p.add_argument("--lengths", type=int, nargs="+", default=[32768, 65536, 131072])
    p.add_argument("--splits", nargs="+", default=["groups", "longnet"])
    p.add_argument("--against", metavar="COMMIT", help="also time the combine kernels of this commit")
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_combine.py times CUDA kernels: no GPU here")
    versions = {"current": combine}
    if args.against:
        versions[args.against] = combine_at(args.against)
    rows = [run_plan(n, split, versions) for n in args.lengths for split in args.splits]
    result = {
        "meta": {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                 "triton": importlib.import_module("triton").__version__, "git_commit": git_commit(),
                 "argv": sys.argv[1:]},
        "rows": rows,
    }
    print("wrote", write_json(os.path.join(args.out, "combine.json"), result))


if __name__ == "__main__":
    main()
