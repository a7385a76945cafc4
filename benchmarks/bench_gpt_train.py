"""End-to-end training benchmark: tokens/s of a GPT training step at long context.

One GPU, one process, every (context length, backend) pair:

    python benchmarks/bench_gpt_train.py --out DIR [--lengths 8k,16k,32k,64k,128k,256k]
        [--backends inductor,dilated,seed] [--layers 24 --width 1024 --heads 16]
        [--steps 3 --warmup 2] [--time-budget-s 420]

Two GPUs, sequence parallel (ring attention, zigzag layout), per rank:

    torchrun --nproc-per-node 2 benchmarks/bench_gpt_train.py --ring --out DIR

CPU smoke run at tiny sizes (also with --ring under torchrun, gloo):

    python benchmarks/bench_gpt_train.py --quick --out DIR

Results to commit: run into $OUT, copy ``gpt_train.json`` to
``benchmarks/results/gpt_train_<device>_torch<version>.json`` and run
``benchmarks/plot_gpt_train.py`` on the copy (the PNG lands next to it; the
printed tables go into docs/performance.md).

The default lengths run in the order 64k, 8k, 128k, 256k, 32k, 16k: the
targets' lengths first, so that a short GPU budget (--time-budget-s, 420 s)
ends with what matters. The warm compile time is measured at the first
length only unless --warm-compile all. --checkpoint recomputes every block
in backward, for contexts whose activations do not fit otherwise. With
flash attention, dense attention's memory is linear in the length too, so
without --checkpoint the longest context is expected to be set mostly by the
activations saved for the linear layers, alike for every backend (not
measured yet).

Backends (single GPU):

- ``inductor``: ``torch.compile(block, backend="inductor")``; attention is
  causal ``F.scaled_dot_product_attention`` (flash / cuDNN on CUDA).
- ``dilated``: ``torch.compile(block, backend="dilated")`` with the
  LongNet-style policy written to ``DIR/policy_dilated_<N>.json`` (LongNet's
  head split: every head attends with every pattern).
- ``dilated_groups``: the same with ``head_split: groups`` (the heads split
  among the patterns): the attention the seed algorithm computes, so the
  like-for-like comparison with ``seed``.
- ``seed``: the whole model eager, its attention the seed library's
  algorithm (``seed_algorithm`` of ``benchmarks/bench_dilated.py``, causal,
  ``groups`` head split) on the same segments and rates.

Ring backends (``--ring``): ``ring_dense`` (dense causal ring) and
``ring_dilated`` (the LongNet policy with segments clipped to the shard's
zigzag chunk, so that no segment crosses ranks), both through
``backend="dilated"`` with ``ring: {layout: zigzag}``.

The model is compiled block by block (regional compilation: every block
shares one compiled graph), the same way for ``inductor`` and ``dilated``;
embedding, loss (chunked, recomputed in backward so the N x vocab logits
are never stored) and the optimizer run eagerly. The JSON in DIR
(``gpt_train.json``, ``gpt_train_ring.json`` for --ring) is rewritten after
every configuration, so a killed run keeps what it measured.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from typing import Any

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)
sys.path.insert(0, HERE)

import dilated_compile  # noqa: E402
from gpt_model import (  # noqa: E402
    GPT, LONGNET_RATES, LONGNET_SEGMENTS, clip_patterns, count_params,
    dense_ring_policy, longnet_policy,
)

SINGLE_BACKENDS = ("inductor", "dilated", "dilated_groups", "seed")
RING_BACKENDS = ("ring_dense", "ring_dilated")
# The head split of each dilated backend: "longnet" (every head uses every pattern, the LongNet
# paper's) and "groups" (heads split among the patterns: the same attention as the seed algorithm).
HEAD_SPLIT = {"dilated": "longnet", "dilated_groups": "groups"}
# The order the configurations run in: the targets' lengths (64k, 8k) first, then the longest
# (where the maximum context is found), then the rest; a short GPU budget then ends with what matters.
DEFAULT_LENGTHS = "64k,8k,128k,256k,32k,16k"
OUT_OF_MEMORY = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


# ----------------------------------------------------------------------------- environment


@dataclass
class Setup:
    """What every configuration of one run shares."""

    device: torch.device
    dtype: torch.dtype
    layers: int
    width: int
    heads: int
    vocab: int
    steps: int
    warmup: int
    segments: tuple[int, ...]
    rates: tuple[int, ...]
    min_seq_len: int
    out: str
    rank: int = 0
    world: int = 1
    check_loss: bool = False  # compare the first loss with an eager single-process run
    checkpoint_blocks: bool = False  # activation checkpointing of every block
    warm_compile_lengths: tuple[int, ...] = ()  # lengths at which the warm compile time is measured


def git_commit() -> str | None:
    """The repository's HEAD commit (with '-dirty' when the tree has changes), or None."""
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


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def use_fresh_caches(directory: str) -> None:
    """Point Inductor's and Triton's on-disk caches at `directory` and drop in-memory compile caches."""
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = directory
    os.environ["TRITON_CACHE_DIR"] = os.path.join(directory, "triton")
    drop_in_memory_caches()


def drop_in_memory_caches() -> None:
    """Forget compiled frames (Dynamo) and Inductor's in-memory caches; disk caches stay."""
    torch._dynamo.reset()
    import torch._inductor.utils as inductor_utils

    clear = getattr(inductor_utils, "clear_caches", None) or getattr(inductor_utils, "clear_inductor_caches", None)
    if clear is not None:
        clear()


def is_oom(error: BaseException) -> bool:
    """True for a device out-of-memory error, also when wrapped by the compiler."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OUT_OF_MEMORY) or "out of memory" in str(error).lower():
            return True
        error = error.__cause__ or error.__context__
    return False


# ----------------------------------------------------------------------------- one configuration


def make_batch(n: int, vocab: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids (1, n) and next-token labels (1, n), the same on every rank."""
    g = torch.Generator().manual_seed(n)
    tokens = torch.randint(0, vocab, (1, n + 1), generator=g)
    return tokens[:, :-1].to(device), tokens[:, 1:].to(device)


def attach(model: GPT, backend: str, n: int, s: Setup) -> dict | None:
    """Set the model up for `backend` at global length n; the policy used, if any."""
    policy = None
    seg, rates = clip_patterns(s.segments, s.rates, n)
    if backend == "seed":
        for block in model.blocks:
            block.attn.seed = (seg, rates)
        return None
    if backend in ("dilated", "dilated_groups"):
        policy = longnet_policy(seg, rates, s.min_seq_len, head_split=HEAD_SPLIT[backend])
    elif backend == "ring_dense":
        policy = dense_ring_policy()
    elif backend == "ring_dilated":
        chunk = n // (2 * s.world)  # zigzag: a segment must lie inside one chunk of a shard
        policy = longnet_policy(*clip_patterns(s.segments, s.rates, chunk), min_seq_len=0, ring=True)
    elif backend != "inductor":
        raise ValueError(f"unknown backend {backend!r}: expected one of {SINGLE_BACKENDS + RING_BACKENDS}")
    compile_backend = "inductor" if backend == "inductor" else "dilated"
    options = None if policy is None else {"policy": policy}
    for block in model.blocks:
        block.compile(backend=compile_backend, options=options, dynamic=False)
    return policy


class StepTimer:
    """Wall time of one step: CUDA events on a GPU, perf_counter on CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __enter__(self):
        if self.cuda:
            self.start, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.start.record()
        else:
            self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            self.end.record()
            self.end.synchronize()
            self.ms = self.start.elapsed_time(self.end)
        else:
            self.ms = (time.perf_counter() - self.t0) * 1e3
        return False


def expected_attention(backend: str, n: int, s: Setup) -> tuple[list[int], list[int], str] | None:
    """The dilated (segments, rates, head split) `backend` computes at global length n; None for dense."""
    if backend in HEAD_SPLIT and n >= s.min_seq_len:
        return (*clip_patterns(s.segments, s.rates, n), HEAD_SPLIT[backend])
    if backend == "ring_dilated":
        return (*clip_patterns(s.segments, s.rates, n // (2 * s.world)), "longnet")
    return None


def build_model(s: Setup, device: torch.device) -> GPT:
    """The model, initialised on `device` from seed 0 (the same weights for every configuration)."""
    torch.manual_seed(0)
    with device:
        model = GPT(s.layers, s.width, s.heads, s.vocab)
    return model.to(s.dtype)


def reference_first_loss(backend: str, n: int, s: Setup) -> float:
    """The loss before any step, of the same model run eagerly on the whole sequence in one process,
    with the attention `backend` should compute (dense SDPA, or eager `dilated_attention`)."""
    model = build_model(s, s.device)
    dilated = expected_attention(backend, n, s)
    for block in model.blocks:
        block.attn.dilated = dilated
    idx, labels = make_batch(n, s.vocab, s.device)
    with torch.no_grad():
        return (model(idx, torch.arange(n, device=s.device), labels) / labels.numel()).item()


def warm_up_process(s: Setup, cache_dir: str) -> float:
    """Pay the process's one-time costs (device context, kernel libraries, Inductor's compile workers,
    Triton) on a tiny compiled training step, so that no configuration's cold compile includes them."""
    t0 = time.perf_counter()
    use_fresh_caches(cache_dir)
    torch.manual_seed(0)
    with s.device:
        tiny = GPT(1, 64, 2, 256).to(s.dtype)
    tiny.blocks[0].compile(backend="inductor", dynamic=False)
    idx, labels = make_batch(128, 256, s.device)
    tiny(idx, torch.arange(128, device=s.device), labels).backward()
    synchronize(s.device)
    drop_in_memory_caches()
    return time.perf_counter() - t0


def run_config(backend: str, n: int, s: Setup, cache_dir: str) -> dict:
    """Train `steps` timed steps of a fresh model at length n with `backend`; the measurements."""
    dev = s.device
    ring = backend in RING_BACKENDS
    idx, labels = make_batch(n, s.vocab, dev)
    pos = torch.arange(n, device=dev)
    n_tokens = labels.numel()
    if ring:
        idx, labels, pos = (dilated_compile.shard(t, t.dim() - 1, "zigzag") for t in (idx, labels, pos))

    model = build_model(s, dev)
    model.checkpoint_blocks = s.checkpoint_blocks
    use_fresh_caches(cache_dir)
    dilated_compile.clear_reports()
    policy = attach(model, backend, n, s)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=dev.type == "cuda")
    params = list(model.parameters())
    losses: list[torch.Tensor] = []

    def step() -> None:
        loss = model(idx, pos, labels) / n_tokens
        loss.backward()
        if ring:
            for p in params:  # sequence parallel: every rank saw part of the tokens
                torch.distributed.all_reduce(p.grad)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())

    row: dict[str, Any] = {"backend": backend, "length": n, "policy": policy}
    t0 = time.perf_counter()
    step()  # compiles (cold caches)
    synchronize(dev)
    row["first_step_s"] = time.perf_counter() - t0
    for _ in range(s.warmup - 1):
        step()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    times = []
    for _ in range(s.steps):
        with StepTimer(dev) as t:
            step()
        times.append(t.ms)
    row["step_ms"] = times
    row["step_ms_median"] = statistics.median(times)
    row["tokens_per_s"] = n / (row["step_ms_median"] / 1e3)  # global tokens (all ranks) per step
    row["peak_mem_gib"] = torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None
    compiled = backend != "seed"
    row["cold_compile_s"] = max(row["first_step_s"] - row["step_ms_median"] / 1e3, 0.0) if compiled else 0.0
    row["sites"] = [
        {"module": site.module, "status": site.status, "attention": site.attention, "reason": site.reason}
        for report in dilated_compile.reports()
        for site in report.sites
    ]
    if compiled and n in s.warm_compile_lengths:  # warm: Dynamo reset, in-memory caches dropped, same disk caches
        drop_in_memory_caches()
        synchronize(dev)
        t0 = time.perf_counter()
        step()
        synchronize(dev)
        row["warm_first_step_s"] = time.perf_counter() - t0
        row["warm_compile_s"] = max(row["warm_first_step_s"] - row["step_ms_median"] / 1e3, 0.0)
    else:
        row["warm_compile_s"] = 0.0 if not compiled else None
    stacked = torch.stack(losses)
    if ring:  # each rank's loss is its shard's part of the global mean
        torch.distributed.all_reduce(stacked)
    row["losses"] = stacked.tolist()
    if s.check_loss and backend != "seed":
        row["reference_first_loss"] = reference_first_loss(backend, n, s)
    if not all(math.isfinite(x) for x in row["losses"]):
        raise FloatingPointError(f"{backend} at {n}: non-finite loss {row['losses']}")
    row["status"] = "ok"
    return row


# ----------------------------------------------------------------------------- the sweep


def parse_length(text: str) -> int:
    """'8k' -> 8192, '1m' -> 1048576, '512' -> 512."""
    text = text.strip().lower()
    scale = {"k": 1024, "m": 1024**2}.get(text[-1:], 1)
    digits = text[:-1] if scale > 1 else text
    try:
        return int(digits) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad length {text!r}: write e.g. 8k, 64k or 4096") from None


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


def free_device(device: torch.device) -> None:
    """Release what a finished or failed configuration left behind."""
    drop_in_memory_caches()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def agree_on_all_ranks(value: Any, s: Setup) -> list:
    """Every rank's `value` (a list of one element when not distributed)."""
    if s.world == 1:
        return [value]
    gathered: list = [None] * s.world
    torch.distributed.all_gather_object(gathered, value)
    return gathered


def sweep(args: argparse.Namespace, s: Setup, backends: list[str], lengths: list[int]) -> dict:
    """Run every (length, backend) in order within the time budget; write JSON after each."""
    name = "gpt_train_ring.json" if args.ring else "gpt_train.json"
    path = os.path.join(s.out, name)
    results = {
        "meta": {
            **environment(s.device),
            "mode": "ring" if args.ring else "single",
            "world_size": s.world,
            "dtype": str(s.dtype).replace("torch.", ""),
            "model": {
                "layers": s.layers, "width": s.width, "heads": s.heads, "head_dim": s.width // s.heads,
                "vocab": s.vocab, "positions": "rotary", "tied_embeddings": True,
                "params": count_params(build_model(s, torch.device("meta"))),
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
            "cold_compile": "first step minus the median step, Inductor and Triton caches in a fresh directory, "
                            "after torch._dynamo.reset() and torch._inductor.utils.clear_caches()",
            "warm_compile": "same process, after the timed steps: torch._dynamo.reset() and "
                            "torch._inductor.utils.clear_caches(), the same cache directories (FX graph, "
                            "AOTAutograd, autotune and Triton caches hit on disk); first step minus the median step",
            "seed": "bench_dilated.seed_algorithm (groups head split, causal), the whole model eager",
            "time_budget_s": args.time_budget_s,
            "activation_checkpointing": s.checkpoint_blocks,
            "warm_compile_lengths": list(s.warm_compile_lengths),
            "quick": args.quick,
            "inductor_cpp": "scalar, -O0 (quick)" if args.quick and s.device.type == "cpu" else "default",
            "argv": sys.argv[1:],
        },
        "runs": [],
    }
    start = time.perf_counter()
    blocked: dict[str, tuple[int, str]] = {}  # backend -> (length, why) longer lengths are skipped
    last_duration: dict[str, tuple[int, float]] = {}
    cache_root = tempfile.mkdtemp(prefix="gpt_train_caches_")
    try:
        if not args.quick:
            results["meta"]["process_warm_up_s"] = warm_up_process(s, os.path.join(cache_root, "warm_up"))
        for n in lengths:
            for backend in backends:
                if s.world > 1 and n % (2 * s.world):
                    raise SystemExit(f"length {n} is not a multiple of 2 * world size = {2 * s.world} (zigzag)")
                row: dict[str, Any] = {"backend": backend, "length": n}
                elapsed = time.perf_counter() - start
                guess = 0.0
                if backend in last_duration:
                    prev_n, prev_s = last_duration[backend]
                    guess = prev_s * max(n / prev_n, 1.0)
                # every rank decides the same, so no rank waits in a collective for another
                skip_budget = max(agree_on_all_ranks(elapsed + guess > args.time_budget_s, s))
                if backend in blocked and n > blocked[backend][0]:
                    row.update(status="skipped", reason=blocked[backend][1])
                elif skip_budget:
                    row.update(status="skipped", reason=f"time budget: {elapsed:.0f} s spent, next estimated {guess:.0f} s")
                else:
                    t0 = time.perf_counter()
                    cache_dir = os.path.join(cache_root, f"{backend}_{n}")
                    try:
                        row = run_config(backend, n, s, cache_dir)
                    except Exception as e:  # noqa: BLE001 - recorded, and longer lengths skipped
                        status = "oom" if is_oom(e) else "error"
                        row.update(status=status, reason=f"{type(e).__name__}: {str(e)[:2000]}")
                        if status == "error" and s.rank == 0:
                            traceback.print_exc()
                        e.__traceback__ = None
                        del e
                    free_device(s.device)
                    row["config_wall_s"] = time.perf_counter() - t0
                    last_duration[backend] = (n, row["config_wall_s"])
                    statuses = agree_on_all_ranks(row["status"], s)
                    if any(st != "ok" for st in statuses):
                        bad = next(st for st in statuses if st != "ok")
                        row["status"] = row["status"] if row["status"] != "ok" else f"{bad} on another rank"
                        if "oom" in statuses:  # longer contexts need more memory; other errors may be length-specific
                            blocked[backend] = (n, f"out of memory at length {n}")
                if s.world > 1:
                    per_rank = agree_on_all_ranks(
                        {k: row.get(k) for k in ("step_ms_median", "peak_mem_gib", "cold_compile_s",
                                                 "warm_compile_s", "status", "reason")}, s)
                    row["ranks"] = per_rank
                    if row["status"] == "ok":  # the step is as slow as the slowest rank
                        row["step_ms_median"] = max(r["step_ms_median"] for r in per_rank)
                        row["tokens_per_s"] = n / (row["step_ms_median"] / 1e3)
                        row["peak_mem_gib"] = max((r["peak_mem_gib"] or 0.0) for r in per_rank) or None
                        row["cold_compile_s"] = max(r["cold_compile_s"] for r in per_rank)
                        warm = [r["warm_compile_s"] for r in per_rank if r["warm_compile_s"] is not None]
                        row["warm_compile_s"] = max(warm) if warm else None
                results["runs"].append(row)
                results["summary"] = summarize(results["runs"], backends)
                if s.rank == 0:
                    brief = {k: row.get(k) for k in ("backend", "length", "status", "tokens_per_s", "step_ms_median",
                                                     "peak_mem_gib", "cold_compile_s", "warm_compile_s", "reason")}
                    print(json.dumps(brief), flush=True)
                    with open(path + ".tmp", "w") as f:
                        json.dump(results, f, indent=1)
                    os.replace(path + ".tmp", path)
    finally:
        shutil.rmtree(cache_root, ignore_errors=True)
    return results


def write_policies(s: Setup, lengths: list[int], ring: bool) -> None:
    """The policies of the run, as the backend gets them, for the record."""
    if s.rank:
        return
    for n in lengths:
        if ring:
            chunk = n // (2 * s.world)
            policies = {"ring_dense": dense_ring_policy(),
                        "ring_dilated": longnet_policy(*clip_patterns(s.segments, s.rates, chunk), 0, ring=True)}
        else:
            policies = {
                name: longnet_policy(*clip_patterns(s.segments, s.rates, n), s.min_seq_len, head_split=split)
                for name, split in HEAD_SPLIT.items()
            }
        for name, policy in policies.items():
            with open(os.path.join(s.out, f"policy_{name}_{n}.json"), "w") as f:
                json.dump(policy, f, indent=1)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="folder for the JSON and the policies")
    p.add_argument("--lengths", default=None, help="comma list, e.g. 8k,16k,32k (default 8k..256k; quick 256,512)")
    p.add_argument("--backends", default=None, help=f"comma list of {SINGLE_BACKENDS} (or {RING_BACKENDS} with --ring)")
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--heads", type=int, default=None)
    p.add_argument("--vocab", type=int, default=None)
    p.add_argument("--steps", type=int, default=None, help="timed steps, median reported (default 3; quick 2)")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed steps, the first (compiling) one included (default 2; quick 1)")
    p.add_argument("--min-seq-len", type=int, default=None,
                   help="the dilated policy's min_seq_len: shorter contexts stay dense (default 16384; quick 512)")
    p.add_argument("--time-budget-s", type=float, default=420.0,
                   help="start no configuration that is estimated to end after this many seconds")
    p.add_argument("--check-loss", action=argparse.BooleanOptionalAction, default=None,
                   help="record the first loss of an eager single-process run of the same attention "
                        "(reference_first_loss) next to each configuration's (default: on with --quick)")
    p.add_argument("--checkpoint", action="store_true",
                   help="activation checkpointing of every block (memory O(N) per model, not per layer)")
    p.add_argument("--warm-compile", choices=("all", "first", "none"), default=None,
                   help="at which lengths to measure the warm compile time: all, the first length of "
                        "--lengths, or none (default first; quick all)")
    p.add_argument("--ring", action="store_true", help="sequence parallel over torchrun's ranks (ring backends)")
    p.add_argument("--quick", action="store_true", help="CPU, tiny model, lengths 256 and 512, under a minute")
    args = p.parse_args(argv)
    args.steps = args.steps or (2 if args.quick else 3)
    args.warmup = args.warmup or (1 if args.quick else 2)
    if args.steps < 1 or args.warmup < 1:
        p.error("--steps and --warmup must be at least 1 (the first warm-up step is the compiling one)")
    q = args.quick
    args.layers = args.layers or (2 if q else 24)
    args.width = args.width or (64 if q else 1024)
    args.heads = args.heads or (4 if q else 16)
    args.vocab = args.vocab or (512 if q else 32000)
    args.min_seq_len = args.min_seq_len if args.min_seq_len is not None else (512 if q else 16384)
    lengths = args.lengths or ("256,512" if q else DEFAULT_LENGTHS)
    args.lengths = [parse_length(x) for x in lengths.split(",") if x.strip()]
    default_backends = RING_BACKENDS if args.ring else SINGLE_BACKENDS
    args.backends = [b.strip() for b in (args.backends or ",".join(default_backends)).split(",") if b.strip()]
    for b in args.backends:
        if b not in default_backends:
            p.error(f"--backends: {b!r} is not one of {', '.join(default_backends)}" + (" (with --ring)" if args.ring else ""))
    # segments scale with the lengths in quick mode (LongNet's 2k..32k over 8k..256k)
    scale = 32 if q else 1
    args.segments = tuple(w // scale for w in LONGNET_SEGMENTS)
    args.target_long, args.target_short = (512, 256) if q else (65536, 8192)
    args.warm_compile = args.warm_compile or ("all" if q else "first")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    rank, world = 0, 1
    if args.ring:
        if "RANK" not in os.environ:
            raise SystemExit("--ring runs under torchrun: torchrun --nproc-per-node 2 benchmarks/bench_gpt_train.py --ring ...")
        use_cuda = torch.cuda.is_available() and not args.quick
        if use_cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        torch.distributed.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(seconds=600))
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        device = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")
    else:
        device = torch.device("cuda" if torch.cuda.is_available() and not args.quick else "cpu")
    if device.type == "cpu" and not args.quick:
        print("no GPU: running the full-size sweep on CPU (use --quick for a smoke run)", file=sys.stderr)
    if args.quick and device.type == "cpu":
        # scalar C++ kernels compile about twice as fast; a smoke run measures nothing that matters
        torch._inductor.config.cpp.vec_isa_ok = False
        torch.set_num_threads(1)  # tiny tensors: threads only add synchronisation on a shared CI machine
        os.environ.setdefault("TORCHINDUCTOR_DEBUG_COMPILE", "1")  # g++ -O0: the C++ compiles in a fraction
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    s = Setup(
        device=device, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32,
        layers=args.layers, width=args.width, heads=args.heads, vocab=args.vocab, steps=args.steps,
        warmup=args.warmup, segments=args.segments, rates=LONGNET_RATES, min_seq_len=args.min_seq_len,
        out=args.out, rank=rank, world=world, checkpoint_blocks=args.checkpoint,
        warm_compile_lengths={"all": tuple(args.lengths), "first": tuple(args.lengths[:1]), "none": ()}[args.warm_compile],
        check_loss=args.check_loss if args.check_loss is not None else args.quick,
    )
    write_policies(s, args.lengths, args.ring)
    results = sweep(args, s, args.backends, args.lengths)
    if rank == 0:
        print(json.dumps(results["summary"]))
    if args.ring:
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
