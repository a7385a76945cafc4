"""How many compiles a run over several sequence lengths causes, per compile mode.

    python benchmarks/count_recompiles.py [--lengths 200,256,300,512,777] [--out FILE.json]

The model is examples/gpt_example.py's GPT (4 blocks) with
examples/policies/gpt_dilated.yaml (min_seq_len 256). For each of
dynamic=False, automatic dynamic (torch.compile's default) and dynamic=True,
all with fullgraph=True, it runs forward and backward at each length in turn
and records Dynamo's graph count, the number of backend calls (each one a
`dilated_compile` report), the sites rewritten, and the largest difference of
the logits from the same model with float64 reference attention.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
from torch._dynamo.utils import counters

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "examples"))

import dilated_compile  # noqa: E402
from gpt_example import make_model, reference_logits  # noqa: E402

MODES = {"dynamic=False": False, "automatic dynamic": None, "dynamic=True": True}


def run(mode: str, lengths: list[int], policy: str) -> dict:
    torch._dynamo.reset()
    counters.clear()
    dilated_compile.clear_reports()
    torch.manual_seed(0)
    model = make_model()
    compiled = torch.compile(model, backend="dilated", options={"policy": policy}, fullgraph=True,
                             dynamic=MODES[mode])
    rows = []
    for n in lengths:
        idx = torch.randint(0, 256, (1, n))
        logits = compiled(idx)
        logits.float().pow(2).mean().backward()
        ref = reference_logits(model, idx, dilated_compile.load_policy(policy), n)
        model.zero_grad(set_to_none=True)
        last = dilated_compile.reports()[-1]
        rows.append({
            "seq_len": n,
            "graphs_so_far": counters["stats"]["unique_graphs"],
            "backend_calls_so_far": len(dilated_compile.reports()),
            "last_graph_sites": [f"{s.status}: {s.attention or s.reason}" for s in last.sites[:1]],
            "max_abs_diff_vs_reference": (logits.double() - ref).abs().max().item(),
        })
        print(mode, rows[-1], flush=True)
    return {"mode": mode, "rows": rows}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="200,256,300,512,777")
    parser.add_argument("--policy", default=os.path.join(HERE, "..", "examples", "policies", "gpt_dilated.yaml"))
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    lengths = [int(n) for n in args.lengths.split(",")]
    results = [run(mode, lengths, args.policy) for mode in args.modes.split(",")]
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"torch": torch.__version__, "lengths": lengths, "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
