"""Table and plot of a `bench_ring.py` result: scaling efficiency against tokens per rank.

    python benchmarks/plot_ring.py RESULTS.json [--png OUT.png]

Prints a markdown table (efficiency = one GPU's time / W / ring time, forward
and forward+backward, for ours and torch's context_parallel) with the target
efficiencies, and draws efficiency against tokens per rank.
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
    """The target efficiency at this many tokens per rank (None: no target)."""
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


def _ms(entry: dict | None, mode: str) -> str:
    if not entry:
        return "-"
    return "error" if "error" in entry else f"{entry[f'{mode}_ms']:.2f}"


def dilated_table(results: dict) -> str:
    """Dilated and block-sparse rings (eager `ring_attention`, and through the backend):
    useful forward TFLOP/s per GPU and forward+backward time against one GPU."""
    lines = [
        "| inner | tokens/rank | one GPU fwd TFLOP/s | ring fwd TFLOP/s per GPU (eager / backend) "
        "| one GPU fwd+bwd ms | ring fwd+bwd ms (eager / backend) | backend compile s (fwd / fwd+bwd) |",
        "|---|---|---|---|---|---|---|",
    ]
    for key in INNERS:
        for row in results["rows"]:
            d = row.get(key) or {}
            if "skipped" in d or "single" not in d:
                continue
            compiled = d.get("ring_compiled") or {}
            compile_s = (f"{compiled['compile_fwd_s']:.0f} / {compiled['compile_fwdbwd_s']:.0f}"
                         if "compile_fwd_s" in compiled else "-")
            cells = [
                fmt(d.get("single_fwd_tflops_per_gpu"), 0),
                f"{fmt(d.get('ring_fwd_tflops_per_gpu'), 0)} / {fmt(d.get('ring_compiled_fwd_tflops_per_gpu'), 0)}",
                _ms(d["single"], "fwdbwd"),
                f"{_ms(d.get('ring'), 'fwdbwd')} / {_ms(compiled, 'fwdbwd')}",
                compile_s,
            ]
            lines.append(f"| {key} | {row['per_rank'] // 1024}k | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_inner(results: dict, ax) -> bool:
    """Per-GPU forward TFLOP/s of the dilated and block-sparse rings and of one GPU; False if
    the results have none."""
    drawn = False
    for i, key in enumerate(INNERS):
        rows = [r for r in results["rows"] if "single" in (r.get(key) or {})]
        if not rows:
            continue
        xs = [r["per_rank"] for r in rows]
        for name, style, label in (("single", ":", "one GPU"), ("ring", "--", "ring, eager"),
                                   ("ring_compiled", "-", "ring, backend")):
            ys = [r[key].get(f"{name}_fwd_tflops_per_gpu") for r in rows]
            if any(y is not None for y in ys):
                ax.plot(xs, [float("nan") if y is None else y for y in ys], linestyle=style, marker="o",
                        color=f"C{i}", label=f"{key}: {label}")
                drawn = True
    ax.set_xscale("log", base=2)
    ax.set_xlabel("tokens per rank")
    ax.set_ylabel("useful forward TFLOP/s per GPU")
    ax.set_title("dilated and block-sparse rings")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
    return drawn


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dense = any("single" in row for row in results["rows"])
    inner = any("single" in (row.get(k) or {}) for row in results["rows"] for k in INNERS)
    fig, axes = plt.subplots(1, 2 * dense + inner, figsize=(5.5 * (2 * dense + inner), 4), squeeze=False)
    axes = list(axes[0])
    if inner:
        plot_inner(results, axes.pop())
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
    if dense:
        axes[0].set_ylabel("efficiency (one GPU time / W / ring time)")
        axes[0].legend(fontsize=8)
    fig.suptitle(f"causal rings, zigzag, bf16, H={results['heads']}, D={results['head_dim']} - "
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
