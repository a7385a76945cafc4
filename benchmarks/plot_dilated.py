"""Plot benchmarks/results/dilated_*.json: ratio to dense SDPA and peak memory against N.

    python benchmarks/plot_dilated.py benchmarks/results/dilated_h200_torch2.11_7f403b3.json
"""

import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


GROUPS = ([2048, 4096, 8192, 16384, 32768], [1, 2, 4, 8, 16])
LONGNET = ([2048, 4096, 8192, 16384, 32768], [1, 2, 4, 6, 12])


def cost_model_vs_measured(res) -> str:
    """The cost model's predicted FLOPs ratio (dilated / dense) next to the
    measured forward time ratio (compiled dilated / dense SDPA) of a run."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
    from dilated_compile.cost import dense_cost, dilated_cost

    lines = ["| N | split | predicted FLOPs ratio | measured fwd time ratio | measured / predicted |",
             "|---|---|---|---|---|"]
    h, d = res["heads"], res["head_dim"]
    for row in res["rows"]:
        n = row["N"]
        dense = dense_cost(1, h, d, is_causal=False, dtype_bytes=2).at(n)[0]
        for split, (seg, rates) in (("groups", GROUPS), ("longnet", LONGNET)):
            cost = dilated_cost(1, h, d, seg, rates, head_split=split, is_causal=False, dtype_bytes=2)
            predicted = cost.at(n)[0] / dense
            measured = row[split]["compiled_fwd_ms"] / row["dense_fwd_ms"]
            lines.append(f"| {n // 1024}k | {split} | {predicted:.4f} | {measured:.4f} | {measured / predicted:.2f} |")
    return "\n".join(lines)


def main(path: str) -> None:
    res = json.load(open(path))
    print(cost_model_vs_measured(res))
    ns = [row["N"] for row in res["rows"]]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for split, color in (("groups", "tab:blue"), ("longnet", "tab:orange")):
        for mode, style in (("fwd", "-o"), ("fwdbwd", "--s")):
            ys = [row[split][f"compiled_{mode}_ratio_to_dense"] for row in res["rows"]]
            ax1.plot(ns, ys, style, color=color, label=f"{split} compiled {mode}")
        ys = [row[split]["eager_fwd_ratio_to_dense"] for row in res["rows"]]
        ax1.plot(ns, ys, ":", color=color, label=f"{split} eager fwd")
        for mode, marker in (("fwd", "^"), ("fwdbwd", "v")):  # results that have them
            key = f"compiled_gpu_{mode}_ratio_to_dense"
            if all(key in row[split] for row in res["rows"]):
                ys = [row[split][key] for row in res["rows"]]
                ax1.plot(ns, ys, marker, color=color, alpha=0.6, ls="none",
                         label=f"{split} compiled {mode}, GPU time (host ahead)")
        ax2.plot(ns, [row[split]["compiled_fwdbwd_peak_mib"] for row in res["rows"]], "-o",
                 color=color, label=f"{split} compiled fwd+bwd")
    ax1.axhline(0.85, color="gray", lw=0.8, ls="-.", label="target fwd 0.85")
    ax1.axhline(0.70, color="gray", lw=0.8, ls=":", label="target fwd+bwd 0.70")
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_xticks(ns, [f"{n // 1024}k" for n in ns])
        ax.set_xlabel("sequence length N")
    ax1.legend(fontsize=6, ncol=2, loc="lower center")
    ax2.legend(fontsize=7)
    ax1.set_ylabel("useful TFLOP/s / dense SDPA TFLOP/s")
    ax1.set_ylim(0, 1.05)
    ax2.set_ylabel("peak memory above inputs (MiB)")
    fig.suptitle(f"dilated attention, {res['device']}, torch {res['torch']}, bf16, "
                 f"B=1 H={res['heads']} D={res['head_dim']}", fontsize=9)
    fig.tight_layout()
    out = path.replace(".json", ".png")
    fig.savefig(out, dpi=110)
    print("wrote", out)


if __name__ == "__main__":
    main(sys.argv[1])
