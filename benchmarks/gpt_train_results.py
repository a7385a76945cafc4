"""What the end-to-end training benchmark writes: the JSON's meta block, its summary, the file.

``gpt_train.json`` (``gpt_train_ring.json`` with --ring) holds ``meta`` (the
environment and every setting of the run), ``runs`` (one row per
configuration, in the order they ran) and ``summary`` (per backend, the
longest context that ran and what stopped the next one). It is rewritten
after every configuration, so a killed run keeps what it measured.
`plot_gpt_train.py` reads it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys

import torch

from dilated_compile.backend import compiler_from
from gpt_train_config import Setup

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
# the fields of a row printed as one JSON line when it is done
BRIEF_FIELDS = ("backend", "length", "status", "tokens_per_s", "step_ms_median", "peak_mem_gib",
                "cold_compile_s", "warm_compile_s", "package_cache_hits", "reason")


def git_commit() -> str | None:
    """The repository's HEAD commit (with '-dirty' when the tree has changes), or None;
    the GIT_COMMIT environment variable where set (a copy of the tree whose git
    directory is not its own)."""
    if os.environ.get("GIT_COMMIT"):
        return os.environ["GIT_COMMIT"]
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True,
            text=True, timeout=10,
        ).stdout.strip()
        return head + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def environment(device: torch.device) -> dict:
    """Device name, torch / triton / CUDA versions, git commit, host."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    return {
        "device": name,
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "git_commit": git_commit(),
        "python": platform.python_version(),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def run_meta(args: argparse.Namespace, s: Setup, backends: list[str], lengths: list[int], params: int) -> dict:
    """The meta block: the environment, the model, and every setting that shapes the numbers."""
    if s.fresh_caches:
        cold = ("first step minus the median step, Inductor and Triton caches in a fresh directory, "
                "after torch._dynamo.reset() and torch._inductor.utils.clear_caches()")
    else:
        cold = ("first step minus the median step, after torch._dynamo.reset() and "
                "torch._inductor.utils.clear_caches(); one Inductor and Triton cache directory for the "
                "whole run (TORCHINDUCTOR_CACHE_DIR when set, else a new one), so a graph or kernel "
                "compiled already for another configuration is a cache hit")
    return {
        **environment(s.device),
        "mode": "ring" if args.ring else "single",
        "world_size": s.world,
        "dtype": str(s.dtype).replace("torch.", ""),
        "model": {
            "layers": s.layers, "width": s.width, "heads": s.heads, "head_dim": s.width // s.heads,
            "vocab": s.vocab, "positions": "rotary", "tied_embeddings": True, "params": params,
        },
        "batch": 1,
        "optimizer": "AdamW" + (" (fused)" if s.device.type == "cuda" else ""),
        "steps": s.steps,
        "warmup": s.warmup,
        "lengths": lengths,
        "backends": backends,
        "longnet": {"segment_lengths": list(s.segments), "dilation_rates": list(s.rates),
                    "min_seq_len": s.min_seq_len},
        "target_lengths": {"long": args.target_long, "short": args.target_short},
        "compile_scope": "each transformer block compiled (regional); embedding, chunked loss, optimizer eager",
        "cold_compile": cold,
        "fresh_caches_per_configuration": s.fresh_caches,
        "warm_compile": "same process, after the timed steps: torch._dynamo.reset() and "
                        "torch._inductor.utils.clear_caches(), the same cache directories (FX graph, "
                        "AOTAutograd, autotune and Triton caches hit on disk); first step minus the median step",
        "seed": "bench_dilated.seed_algorithm (groups head split, causal), the whole model eager",
        "time_budget_s": args.time_budget_s,
        "activation_checkpointing": s.checkpoint_blocks,
        "warm_compile_lengths": list(s.warm_compile_lengths),
        "quick": args.quick,
        "dilated_compiler": compiler_from({}),  # the backend's choice: DILATED_COMPILER, else Inductor
        "dense_compiler": s.dense_compiler,
        "profile_first_step": s.profile_first_step,
        "inductor_cpp": "scalar, -O0 (quick)" if args.quick and s.device.type == "cpu" else "default",
        "argv": sys.argv[1:],
    }


def summarize(rows: list[dict], backends: list[str]) -> dict:
    """Per backend: the longest length that ran, what stopped it from the next longer one, the first failure."""
    out = {}
    for b in backends:
        mine = [r for r in rows if r["backend"] == b]
        ok = [r["length"] for r in mine if r["status"] == "ok"]
        longest = max(ok) if ok else None
        above = sorted((r for r in mine if r["status"] != "ok" and (longest is None or r["length"] > longest)),
                       key=lambda r: r["length"])
        failed = [r for r in mine if r["status"] not in ("ok", "skipped")]
        out[b] = {
            "max_length": longest,
            # oom / error / skipped (with the reason: the time budget, or a failure at a shorter length)
            "limited_by": f"{above[0]['status']} at {above[0]['length']}: {above[0].get('reason')}" if above
            else "nothing longer was tried",
            "first_failure": {"length": failed[0]["length"], "status": failed[0]["status"]} if failed else None,
        }
    return out


def write_json(path: str, data: dict) -> str:
    """Write `data` to `path` as indented JSON, replacing the file whole (its folder made
    if missing); the path."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(data, f, indent=1)
    os.replace(path + ".tmp", path)
    return path


def record(results: dict, row: dict, path: str) -> None:
    """Append `row`, refresh the summary, print the row's brief line and rewrite the JSON at `path`."""
    results["runs"].append(row)
    results["summary"] = summarize(results["runs"], results["meta"]["backends"])
    print(json.dumps({k: row.get(k) for k in BRIEF_FIELDS}), flush=True)
    write_json(path, results)
