"""Table and plot of a `bench_ring.py` result: scaling efficiency against tokens per rank.

    python benchmarks/plot_ring.py RESULTS.json [--png OUT.png]

Prints a markdown table (efficiency = one GPU's time / W / ring time, forward
and forward+backward, for ours and torch's context_parallel) with the targets
of the ring issue, and draws efficiency against tokens per rank.
"""

from __future__ import annotations

import argparse
import json
import os

NAMES = {
    "ours_compiled": "ours (backend)",
    "ours_eager": "ours (eager ring_attention)",
    "cp_allgather": "context_parallel (allgather)",
    "cp_alltoall": "context_parallel (alltoall)",
}


def efficiency(row: dict, name: str, mode: str) -> float | None:
    entry = row.get(name) or {}
    return entry.get(f"{mode}_efficiency")


def target(per_rank: int) -> float | None:
    """The issue's target efficiency at this many tokens per rank (None: no target)."""
    if per_rank >= 65536:
        return 0.97
    if per_rank >= 16384:
        return 0.90
    return None


def fmt(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def table(results: dict) -> str:
    lines = [
        "| tokens/rank | N | target | ours fwd / fwd+bwd | ours eager fwd / fwd+bwd "
        "| cp allgather fwd / fwd+bwd | cp alltoall fwd / fwd+bwd |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in results["rows"]:
        cells = [
            f"{fmt(efficiency(row, name, 'fwd'))} / "
            f"{fmt(efficiency(row, name, 'fwdbwd'))}"
            for name in NAMES
        ]
        n = row["per_rank"]
        lines.append(f"| {n // 1024}k | {row['N'] // 1024}k | {fmt(target(n))} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


INNERS = ("dilated", "dilated_long", "block_sparse")  # bench_ring.py --dilated


def dilated_table(results: dict) -> str:
    """Dilated and block-sparse rings: useful forward TFLOP/s per GPU against one GPU."""
    lines = [
        "| inner | tokens/rank | one GPU fwd TFLOP/s | ring fwd TFLOP/s per GPU | one GPU fwd+bwd ms | ring fwd+bwd ms |",
        "|---|---|---|---|---|---|",
    ]
    for key in INNERS:
        for row in results["rows"]:
            d = row.get(key) or {}
            if "skipped" in d or "single" not in d:
                continue
            single, ring = d["single"], d.get("ring", {"error": "not run"})
            cells = [
                fmt(d.get("single_fwd_tflops_per_gpu"), 0), fmt(d.get("ring_fwd_tflops_per_gpu"), 0),
                "error" if "error" in single else f"{single['fwdbwd_ms']:.2f}",
                "error" if "error" in ring else f"{ring['fwdbwd_ms']:.2f}",
            ]
            lines.append(f"| {key} | {row['per_rank'] // 1024}k | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    per_rank = [row["per_rank"] for row in results["rows"]]
    for ax, mode, title in zip(axes, ("fwd", "fwdbwd"), ("forward", "forward + backward")):
        for name, label in NAMES.items():
            ys = [efficiency(row, name, mode) for row in results["rows"]]
            if any(y is not None for y in ys):
                ax.plot(per_rank, [float("nan") if y is None else y for y in ys], marker="o", label=label)
        ax.step([16384, 65536, max(per_rank) * 1.2], [0.90, 0.97, 0.97], where="post", color="grey",
                linestyle="--", label="target")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens per rank")
        ax.set_title(f"{title}, W={results['world_size']}")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("efficiency (one GPU time / W / ring time)")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"causal dense ring, zigzag, bf16, H={results['heads']}, D={results['head_dim']} - "
                 f"{results['device']} x{results['world_size']}, torch {results['torch']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("results")
    p.add_argument("--png", default=None)
    args = p.parse_args()
    with open(args.results) as f:
        results = json.load(f)
    print(table(results))
    print()
    print(dilated_table(results))
    png = args.png or os.path.splitext(args.results)[0] + ".png"
    plot(results, png)
    print("wrote", png)


if __name__ == "__main__":
    main()
