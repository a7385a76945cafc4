"""Command line: what the backend would do to a model.

    python -m dilated_compile explain FILE.py:factory --policy P.yaml --seq-len N [--batch B] [--out DIR]
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import torch

from .cost import format_costs
from .debug import write_graph_files
from .explain import explain


def load_object(spec: str):
    """The object named by "path/to/file.py:name" (or "package.module:name")."""
    if ":" not in spec:
        raise SystemExit(f"error: {spec!r}: expected FILE.py:name")
    where, name = spec.rsplit(":", 1)
    if where.endswith(".py"):
        path = Path(where)
        if not path.is_file():
            raise SystemExit(f"error: {where}: no such file")
        module_spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[path.stem] = module
        module_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(where)
    try:
        return getattr(module, name)
    except AttributeError:
        raise SystemExit(f"error: {where} has no {name!r}") from None


def example_inputs(model: torch.nn.Module, batch: int, seq_len: int) -> tuple:
    """Random inputs for a sequence model: token ids if it starts with an
    embedding, else (batch, seq_len, features) floats for its first Linear."""
    for module in model.modules():
        if isinstance(module, torch.nn.Embedding):
            return (torch.randint(0, module.num_embeddings, (batch, seq_len)),)
        if isinstance(module, torch.nn.Linear):
            return (torch.randn(batch, seq_len, module.in_features),)
    raise SystemExit(
        "error: cannot guess the model's inputs (no nn.Embedding or nn.Linear); "
        "pass --inputs FILE.py:function(batch, seq_len) returning a tuple of tensors"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dilated_compile", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    ex = sub.add_parser(
        "explain",
        help="print the site report and graph diff for a model built by a factory",
        description="Run Dynamo and the rewrite (not Inductor) on the model that FACTORY "
        "builds, with random inputs, and print the site report and the graph diff.",
    )
    ex.add_argument("factory", help="FILE.py:function (or package.module:function) returning the model")
    ex.add_argument("--policy", required=True, help="policy YAML file")
    ex.add_argument("--seq-len", type=int, required=True, help="sequence length of the example inputs")
    ex.add_argument("--batch", type=int, default=1, help="batch size of the example inputs (default 1)")
    ex.add_argument("--inputs", help="FILE.py:function(batch, seq_len) -> tuple of input tensors "
                    "(default: token ids for a model with an nn.Embedding, else floats)")
    ex.add_argument("--out", help="folder to write before.py, after.py, diff.patch and report.txt "
                    "(one sub-folder per graph)")
    args = parser.parse_args(argv)

    model = load_object(args.factory)()
    model.eval()
    if args.inputs:
        inputs = tuple(load_object(args.inputs)(args.batch, args.seq_len))
    else:
        inputs = example_inputs(model, args.batch, args.seq_len)
    report = explain(model, *inputs, policy=args.policy)
    print(report)
    print()
    print("cost model (forward FLOPs; N = sequence length):")
    print(format_costs(report.sites))
    print()
    print(report.diff)
    if args.out:
        for i, graph in enumerate(report.graphs):
            write_graph_files(graph, Path(args.out) / f"graph_{i:03d}")
        print(f"wrote {len(report.graphs)} graph folder(s) to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
