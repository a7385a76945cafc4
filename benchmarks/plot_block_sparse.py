"""Plot benchmarks/results/block_sparse*.json (written by bench_block_sparse.py).

    python benchmarks/plot_block_sparse.py benchmarks/results/block_sparse_h200_torch2.11_current.json [more.json ...] [--out DIR]

For each JSON file it writes two PNGs (next to the file, or into --out):

- ``<name>.png``: time against density on log-log axes, one row of panels per
  (N, pattern kind), forward and forward+backward side by side: the backend's
  rewrite ("ours"), FlexAttention with a precomputed BlockMask ("user flex"),
  the ideal (density x dense flex time), the target (1.25 x ideal), and dense
  SDPA and dense flex as horizontal lines;
- ``<name>_ratio.png``: ours / ideal (and user flex / ideal) against density,
  with the 1.25 target line.

It also prints a markdown table of the ratios (for docs/performance.md) to stdout.
The target applies at densities down to 1/32; points of a sweep
below that are drawn hollow and marked "n/a" in the table.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Iterable

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter  # noqa: E402

TARGET = 1.25  # time <= TARGET x density x dense flex time
MIN_TARGET_DENSITY = 1 / 32  # the target applies down to this density
MODES = (("fwd", "forward"), ("fwdbwd", "forward+backward"))
KIND_COLORS = {"local_window": "tab:blue", "global_local": "tab:orange", "dilated": "tab:green",
               "mask_mod": "tab:purple"}


def in_target_range(p: dict) -> bool:
    """Whether the target applies to this pattern point: its nominal density
    (``target_density``, else the measured one) is at least 1/32."""
    nominal = p.get("target_density", p["density"])
    return nominal >= MIN_TARGET_DENSITY * (1 - 1e-9)


def pattern_params(p: dict) -> str:
    """The pattern's parameters other than kind, e.g. ``global_blocks=2, window=6``."""
    params = {k: v for k, v in p.get("pattern", {}).items() if k != "kind"}
    return ", ".join(f"{k}={v}" for k, v in params.items())


def kinds_of(row: dict) -> list[str]:
    """Pattern kinds of one N's row, in the order they were measured."""
    return list(dict.fromkeys(p["kind"] for p in row["patterns"]))


def points(row: dict, kind: str) -> list[dict]:
    """The row's patterns of one kind, by increasing density."""
    return sorted((p for p in row["patterns"] if p["kind"] == kind), key=lambda p: p["density"])


def fmt_n(n: int) -> str:
    """32768 -> '32k'."""
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def verdict(p: dict) -> str:
    """'yes', 'no (fwd)', ... or 'n/a (below 1/32)' for one pattern point."""
    if not in_target_range(p):
        return "n/a (below 1/32)"
    missed = [label for mode, label in (("fwd", "fwd"), ("fwdbwd", "fwd+bwd"))
              if p[f"ours_{mode}_over_ideal"] > TARGET]
    return "yes" if not missed else f"**no** ({', '.join(missed)})"


def markdown_table(res: dict) -> str:
    """Ours / ideal and user flex / ideal per N, kind and density, with the verdict."""
    lines = [
        "| N | kind | pattern | density | fwd ours / ideal | fwd+bwd ours / ideal "
        "| user flex fwd / fwd+bwd | target met? |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in res["rows"]:
        for kind in kinds_of(row):
            for p in sorted(points(row, kind), key=lambda p: -p["density"]):
                lines.append(
                    f"| {fmt_n(row['N'])} | {kind} | {pattern_params(p)} | {p['density']:.4f} "
                    f"| {p['ours_fwd_over_ideal']:.2f} | {p['ours_fwdbwd_over_ideal']:.2f} "
                    f"| {p['user_flex_fwd_over_ideal']:.2f} / {p['user_flex_fwdbwd_over_ideal']:.2f} "
                    f"| {verdict(p)} |"
                )
    return "\n".join(lines)


def _title(res: dict) -> str:
    """Run description for figure titles."""
    causal = "causal" if res.get("causal") else "non-causal"
    return (f"block-sparse attention, {res.get('device', '?')}, torch {res.get('torch', '?')}, "
            f"{res.get('dtype', '?')}, B={res.get('batch', '?')} H={res.get('heads', '?')} "
            f"D={res.get('head_dim', '?')}, block {res.get('block_size', '?')}, {causal}")


def _scatter(ax, xs: list[float], ys: list[float], filled: list[bool], style: str, color: str,
             label: str) -> None:
    """A line through all points; markers filled where the target applies, hollow elsewhere."""
    marker = style[-1]
    ax.plot(xs, ys, style[:-1], color=color, label=label)
    ax.plot([x for x, f in zip(xs, filled) if f], [y for y, f in zip(ys, filled) if f],
            marker, color=color, ls="none")
    ax.plot([x for x, f in zip(xs, filled) if not f], [y for y, f in zip(ys, filled) if not f],
            marker, color=color, ls="none", mfc="white")


def plot_times(res: dict, out: str) -> None:
    """Time against density, log-log: one row per (N, kind), fwd and fwd+bwd."""
    panels = [(row, kind) for row in res["rows"] for kind in kinds_of(row)]
    fig, axes = plt.subplots(len(panels), 2, figsize=(11, 3.6 * len(panels)), squeeze=False)
    for (row, kind), ax_row in zip(panels, axes):
        pts = points(row, kind)
        xs = [p["density"] for p in pts]
        filled = [in_target_range(p) for p in pts]
        color = KIND_COLORS.get(kind, "tab:blue")
        for (mode, label), ax in zip(MODES, ax_row):
            ideal = [p[f"ideal_{mode}_ms"] for p in pts]
            ax.fill_between(xs, ideal, [TARGET * y for y in ideal], color="tab:green", alpha=0.12,
                            lw=0)
            ax.plot(xs, ideal, ":", color="tab:green", label="ideal: density x dense flex")
            ax.plot(xs, [TARGET * y for y in ideal], "-.", color="tab:green",
                    label=f"target: {TARGET} x ideal")
            _scatter(ax, xs, [p[f"user_flex_{mode}_ms"] for p in pts], filled, "--s", "gray",
                     "user flex (precomputed BlockMask)")
            _scatter(ax, xs, [p[f"ours_{mode}_ms"] for p in pts], filled, "-o", color,
                     "ours (backend rewrite of SDPA)")
            ax.axhline(row[f"dense_sdpa_{mode}_ms"], color="black", lw=0.9, ls="-",
                       label=f"dense SDPA {row[f'dense_sdpa_{mode}_ms']:.1f} ms")
            ax.axhline(row[f"dense_flex_{mode}_ms"], color="black", lw=0.9, ls="--",
                       label=f"dense flex {row[f'dense_flex_{mode}_ms']:.1f} ms")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))
            ax.yaxis.set_minor_formatter(NullFormatter())
            ax.set_xlabel("density (fraction of active key blocks)")
            ax.set_ylabel("time (ms)")
            ax.set_title(f"N={fmt_n(row['N'])}, {kind}, {label}", fontsize=9)
            ax.grid(True, which="both", lw=0.3, alpha=0.5)
            ax.legend(fontsize=6.5, loc="lower right")
    fig.suptitle(_title(res) + "\nhollow markers: density below 1/32, outside the target",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def plot_ratios(res: dict, out: str) -> None:
    """ours / ideal against density, fwd and fwd+bwd, with the target line."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), squeeze=False)
    multi_n = len(res["rows"]) > 1
    n_styles = ["-", "--", ":", "-."]
    for (mode, label), ax in zip(MODES, axes[0]):
        for i, row in enumerate(res["rows"]):
            for kind in kinds_of(row):
                pts = points(row, kind)
                xs = [p["density"] for p in pts]
                filled = [in_target_range(p) for p in pts]
                color = KIND_COLORS.get(kind, "tab:blue")
                name = f"{kind}, N={fmt_n(row['N'])}" if multi_n else kind
                _scatter(ax, xs, [p[f"ours_{mode}_over_ideal"] for p in pts], filled,
                         n_styles[i % len(n_styles)] + "o", color, f"ours, {name}")
                ax.plot(xs, [p[f"user_flex_{mode}_over_ideal"] for p in pts], ":", color=color,
                        lw=0.9, alpha=0.7, label=f"user flex, {name}")
        ax.axhline(TARGET, color="tab:red", lw=1, ls="-.", label=f"target {TARGET}")
        ax.axhline(1.0, color="gray", lw=0.6)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("density (fraction of active key blocks)")
        ax.set_ylabel("time / (density x dense flex time)")
        ax.set_title(label, fontsize=9)
        ax.set_ylim(bottom=0.8)
        ax.grid(True, which="both", lw=0.3, alpha=0.5)
        ax.legend(fontsize=7)
    fig.suptitle(_title(res) + "\nhollow markers: density below 1/32, outside the target",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def main(argv: Iterable[str] | None = None) -> None:
    """Plot every JSON given and print its markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", help="block_sparse*.json files")
    parser.add_argument("--out", default=None, help="folder for the PNGs (default: next to each JSON)")
    args = parser.parse_args(None if argv is None else list(argv))
    for path in args.paths:
        with open(path) as f:
            res = json.load(f)
        stem = os.path.splitext(os.path.basename(path))[0]
        folder = args.out or os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        times, ratios = os.path.join(folder, f"{stem}.png"), os.path.join(folder, f"{stem}_ratio.png")
        if len(args.paths) > 1:
            print(f"\n{path}:\n")
        print(markdown_table(res))
        plot_times(res, times)
        plot_ratios(res, ratios)
        print(f"\nwrote {times}\nwrote {ratios}")


if __name__ == "__main__":
    main()
