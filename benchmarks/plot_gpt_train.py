"""Plot and tabulate the results of bench_gpt_train.py.

    python benchmarks/plot_gpt_train.py RESULTS.json [--no-plot]

Draws tokens/s and peak memory against context length (log x), one line per
backend, into a PNG next to the JSON (same name, .png), and prints a markdown
table of every configuration followed by the target ratios: dilated / dense
(inductor) tokens/s at each length that has a goal (`SPEEDUP_GOALS`; a smoke
run's short and long lengths take the shortest and longest goal), dilated /
seed at the longest, the compile-time ratio dilated / inductor (cold and
warm, against `COMPILE_GOAL`) and the longest-context ratio.
For a --ring run the ratios compare ring_dilated with ring_dense.
Where the run has ``no_attention`` rows, a last table gives, per length, the
bound they set (inductor's step over theirs: the speed-up of an attention
that cost nothing) and each dilated backend's speed-up against it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any


def length_label(n: int) -> str:
    """65536 -> '64k', 300 -> '300'."""
    return f"{n // 1024}k" if n % 1024 == 0 and n >= 1024 else str(n)


def _fmt(x: Any, digits: int = 1) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:,.{digits}f}"
    return str(x)


def ok_rows(results: dict) -> dict[tuple[str, int], dict]:
    """(backend, length) -> row, for the configurations that ran."""
    return {(r["backend"], r["length"]): r for r in results["runs"] if r["status"] == "ok"}


def runs_table(results: dict) -> str:
    """Markdown table: one line per (length, backend)."""
    lines = [
        "| context | backend | tokens/s | step (ms) | peak memory (GiB) | compile cold (s) | compile warm (s) | status |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results["runs"]:
        status = r["status"] if r["status"] == "ok" else f"{r['status']}: {(r.get('reason') or '')[:80]}"
        lines.append(
            f"| {length_label(r['length'])} | {r['backend']} | {_fmt(r.get('tokens_per_s'), 0)} | "
            f"{_fmt(r.get('step_ms_median'))} | {_fmt(r.get('peak_mem_gib'), 2)} | "
            f"{_fmt(r.get('cold_compile_s'))} | {_fmt(r.get('warm_compile_s'))} | {status} |"
        )
    return "\n".join(lines)


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def target_ratios(results: dict) -> list[dict]:
    """The targets, each with the measured value (None when not measured) and whether it is met.

    Single GPU: for each dilated backend of the run (``dilated``, LongNet's head split, and
    ``dilated_groups``, the seed algorithm's attention).
    """
    ring = results["meta"].get("mode") == "ring"
    if ring:
        return _target_ratios(results, "ring_dilated", "ring_dense", None, RING_SPEEDUP_GOALS, RING_COMPILE_GOAL)
    out = []
    for dil in ("dilated", "dilated_groups"):
        if dil in results["meta"]["backends"]:
            out += _target_ratios(results, dil, "inductor", "seed", SPEEDUP_GOALS, COMPILE_GOAL)
    return out


# Speed-ups over dense attention by length (one GPU: the 12-layer model with the policy from
# 0 tokens; the ring: two GPUs), and the most compile time may grow over dense attention's.
SPEEDUP_GOALS = {8192: 1.3, 16384: 2.3, 32768: 4.0, 65536: 7.0}
COMPILE_GOAL = 1.2
RING_SPEEDUP_GOALS = {8192: 1.0, 65536: 5.0}
RING_COMPILE_GOAL = 1.5


def _target_ratios(results: dict, dil: str, dense: str, seed: str | None, speedup_goals: dict[int, float],
                   compile_goal: float) -> list[dict]:
    rows = ok_rows(results)
    # the goals' lengths that were run, and the run's own short and long lengths (a smoke run's
    # lengths take the shortest and the longest goal)
    lengths = {n for (_, n) in rows}
    goals = {n: g for n, g in speedup_goals.items() if n in lengths}
    targets = results["meta"].get("target_lengths", {})
    for key, pick in (("short", min), ("long", max)):
        if targets.get(key) and targets[key] not in goals:
            goals[targets[key]] = speedup_goals[pick(speedup_goals)]
    long_n = max(goals)

    def tps(backend: str | None, n: int) -> float | None:
        row = rows.get((backend, n))
        return row["tokens_per_s"] if row else None

    out = [
        {"what": f"{dil} / {dense} tokens/s at {length_label(n)}", "value": _ratio(tps(dil, n), tps(dense, n)),
         "target": f">= {goal:g}"}
        for n, goal in sorted(goals.items())
    ]
    if seed:
        out.append({"what": f"{dil} / {seed} tokens/s at {length_label(long_n)}",
                    "value": _ratio(tps(dil, long_n), tps(seed, long_n)), "target": ">= 1.3"})
    for kind in ("cold", "warm"):  # the worst length where both compiled
        ratios = [
            _ratio(rows[(dil, n)][f"{kind}_compile_s"], rows[(dense, n)][f"{kind}_compile_s"])
            for (b, n) in rows if b == dil and (dense, n) in rows
        ]
        ratios = [x for x in ratios if x is not None]
        out.append({"what": f"compile time {dil} / {dense}, {kind} (worst length)",
                    "value": max(ratios) if ratios else None, "target": f"<= {compile_goal:g}"})
    summary = results.get("summary", {})
    max_dil = (summary.get(dil) or {}).get("max_length")
    max_dense = (summary.get(dense) or {}).get("max_length")
    limits = "; ".join(f"{b} limited by {(summary.get(b) or {}).get('limited_by', '?')[:60]}" for b in (dil, dense))
    out.append({"what": f"longest context {dil} / {dense}", "value": _ratio(max_dil, max_dense), "target": ">= 4",
                "note": f"{length_label(max_dil) if max_dil else '-'} / {length_label(max_dense) if max_dense else '-'}"
                        f"; {limits}"})
    for t in out:
        bound = float(t["target"].split()[1])
        v = t["value"]
        t["met"] = None if v is None else (v >= bound if t["target"].startswith(">=") else v <= bound)
    return out


def targets_table(results: dict) -> str:
    """Markdown table of the target ratios."""
    lines = ["| target | measured | goal | met |", "|---|---|---|---|"]
    for t in target_ratios(results):
        value = "not measured" if t["value"] is None else f"{t['value']:.2f}"
        if t.get("note"):
            value += f" ({t['note']})"
        met = "-" if t["met"] is None else ("yes" if t["met"] else "no")
        lines.append(f"| {t['what']} | {value} | {t['target']} | {met} |")
    return "\n".join(lines)


def bound_table(results: dict) -> str | None:
    """Markdown table, per length with a ``no_attention`` row: inductor's step over it (the
    speed-up an attention costing nothing would give), each dilated backend's speed-up, and the
    share of dense attention's time it removes; None without such rows."""
    rows = ok_rows(results)
    lengths = sorted(n for (b, n) in rows if b == "no_attention" and ("inductor", n) in rows)
    if not lengths:
        return None
    dilated = [b for b in ("dilated_groups", "dilated") if b in results["meta"]["backends"]]
    head = "| context | inductor step (ms) | step without attention (ms) | bound |"
    head += "".join(f" {b} speed-up | {b}: share of attention time removed |" for b in dilated)
    lines = [head, "|---" * (4 + 2 * len(dilated)) + "|"]
    for n in lengths:
        dense, free = rows[("inductor", n)]["step_ms_median"], rows[("no_attention", n)]["step_ms_median"]
        line = f"| {length_label(n)} | {_fmt(dense)} | {_fmt(free)} | {_fmt(dense / free, 2)} |"
        for b in dilated:
            step = rows[(b, n)]["step_ms_median"] if (b, n) in rows else None
            removed = (dense - step) / (dense - free) if step is not None and dense > free else None
            line += f" {_fmt(_ratio(dense, step), 2)} | {_fmt(removed, 2)} |"
        lines.append(line)
    return "\n".join(lines)


def describe(results: dict) -> str:
    """One line: device, torch, triton, commit, model."""
    m = results["meta"]
    model = m["model"]
    return (
        f"{m['device']}, torch {m['torch']}, triton {m.get('triton')}, commit {m.get('git_commit')}, "
        f"{m['mode']} x{m['world_size']}; model {model['layers']} layers, width {model['width']}, "
        f"{model['heads']} heads, {model['params'] / 1e6:.3g}M parameters, {m['dtype']}, batch {m['batch']}"
    )


def plot(results: dict, path: str) -> None:
    """tokens/s and peak memory against context length, one line per backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 4.5))
    for backend in results["meta"]["backends"]:
        rows = sorted((r for r in results["runs"] if r["backend"] == backend and r["status"] == "ok"),
                      key=lambda r: r["length"])
        if not rows:
            continue
        xs = [r["length"] for r in rows]
        ax_t.plot(xs, [r["tokens_per_s"] for r in rows], marker="o", label=backend)
        if all(r.get("peak_mem_gib") is not None for r in rows):
            ax_m.plot(xs, [r["peak_mem_gib"] for r in rows], marker="o", label=backend)
        failed = [r for r in results["runs"] if r["backend"] == backend and r["status"] == "oom"]
        if failed:  # where it ran out of memory
            ax_t.axvline(failed[0]["length"], linestyle=":", color=ax_t.lines[-1].get_color(), alpha=0.6)
    lengths = sorted({r["length"] for r in results["runs"]})
    for ax, title, ylabel in ((ax_t, "training throughput", "tokens / s"), (ax_m, "peak memory", "GiB")):
        ax.set_xscale("log", base=2)
        ax.set_xlim(lengths[0] / 1.25, lengths[-1] * 1.25)
        ax.set_xticks(lengths, [length_label(n) for n in lengths])
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        if ax.lines:
            ax.legend()
    ax_t.set_yscale("log")
    if not ax_m.lines:
        ax_m.text(0.5, 0.5, "peak memory not measured (CPU)", ha="center", va="center", transform=ax_m.transAxes)
    fig.suptitle(describe(results), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", help="JSON written by bench_gpt_train.py")
    p.add_argument("--no-plot", action="store_true", help="print the tables only (no matplotlib needed)")
    args = p.parse_args(argv)
    with open(args.results) as f:
        results = json.load(f)
    print(describe(results))
    print()
    print(runs_table(results))
    print()
    print(targets_table(results))
    bounds = bound_table(results)
    if bounds:
        print()
        print(bounds)
    if not args.no_plot:
        png = os.path.splitext(args.results)[0] + ".png"
        plot(results, png)
        print(f"\nwrote {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
