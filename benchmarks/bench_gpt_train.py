"""End-to-end training benchmark: tokens/s of a GPT training step at long context.

One GPU, one process, every (context length, backend) pair:

    python benchmarks/bench_gpt_train.py --out DIR [--lengths 8k,16k,32k,64k,128k,256k]
        [--backends inductor,dilated,seed] [--layers 24 --width 1024 --heads 16]
        [--steps 3 --warmup 2] [--time-budget-s 420]

Two GPUs, sequence parallel (ring attention, zigzag layout), per rank:

    torchrun --nproc-per-node 2 benchmarks/bench_gpt_train.py --ring --out DIR

CPU smoke run at tiny sizes (also with --ring under torchrun, gloo):

    python benchmarks/bench_gpt_train.py --quick --out DIR

``--quick`` trains a 1-layer, width-32 model at lengths 64 and 128 (the
policy's min_seq_len is 128, so the short context stays dense and the long
one is rewritten with three patterns; 128 with --ring), one warm-up and one
timed step per configuration. Its configurations share one Inductor cache
(``TORCHINDUCTOR_CACHE_DIR`` when set, else a new one), so a graph or
kernel another configuration compiled already (the short context's dense
block is the same for all three compiled backends) is a cache hit, and its
cold compile times are not those of fresh caches.

The module layout: ``gpt_train_config.py`` (backends, command line, sizes,
policies), ``gpt_train_measure.py`` (one configuration: build, compile,
train, time), ``gpt_train_ring.py`` (the process group and per-rank
merging), ``gpt_train_results.py`` (the JSON), ``gpt_model.py`` (the model).

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
  ``--dense-compiler eager`` (or ``aot_eager``) compiles these rows without
  Inductor, and ``DILATED_COMPILER`` does the same for the ``dilated`` rows:
  a smoke run of the harness, as the tests make.
- ``dilated``: ``torch.compile(block, backend="dilated")`` with the
  LongNet-style policy written to ``DIR/policy_dilated_<N>.json`` (LongNet's
  head split: every head attends with every pattern).
- ``dilated_groups``: the same with ``head_split: groups`` (the heads split
  among the patterns): the attention the seed algorithm computes, so the
  like-for-like comparison with ``seed``.
- ``seed``: the whole model eager, its attention the seed library's
  algorithm (``seed_algorithm`` of ``benchmarks/bench_dilated.py``, causal,
  ``groups`` head split) on the same segments and rates.
- ``no_attention`` (only when named): the model with each attention's
  output replaced by its values ``v``, compiled by Inductor. Its step is
  everything but attention, so ``inductor``'s step over it bounds the
  speed-up that any attention can give this model at that length.

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

import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from typing import Any

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)
sys.path.insert(0, HERE)

from gpt_model import LONGNET_RATES, count_params  # noqa: E402
from gpt_train_config import Setup, parse_args, write_policies  # noqa: E402
from gpt_train_measure import (  # noqa: E402
    build_model, free_device, is_oom, run_config, use_caches, warm_up_process,
)
from gpt_train_results import record, run_meta  # noqa: E402
from gpt_train_ring import agree_on_all_ranks, check_length, close_ring, init_ring, merge_ranks  # noqa: E402


def sweep(args, s: Setup, backends: list[str], lengths: list[int]) -> dict:
    """Run every (length, backend) in order within the time budget; write JSON after each."""
    path = os.path.join(s.out, "gpt_train_ring.json" if args.ring else "gpt_train.json")
    params = count_params(build_model(s, torch.device("meta")))
    results: dict[str, Any] = {"meta": run_meta(args, s, backends, lengths, params), "runs": []}
    start = time.perf_counter()
    blocked: dict[str, tuple[int, str]] = {}  # backend -> (length, why) longer lengths are skipped
    last_duration: dict[str, tuple[int, float]] = {}
    cache_root = tempfile.mkdtemp(prefix="gpt_train_caches_")
    try:
        if s.fresh_caches:
            results["meta"]["process_warm_up_s"] = warm_up_process(s, os.path.join(cache_root, "warm_up"))
        else:  # one cache for the run: the environment's (which another run may share), else a new one
            shared = os.environ.get("TORCHINDUCTOR_CACHE_DIR") or os.path.join(cache_root, "shared")
            use_caches(shared)
        for n in lengths:
            check_length(n, s)
            for backend in backends:
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
                    try:
                        row = run_config(backend, n, s, os.path.join(cache_root, f"{backend}_{n}"))
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
                    merge_ranks(row, n, s)
                if s.rank == 0:
                    record(results, row, path)
    finally:
        shutil.rmtree(cache_root, ignore_errors=True)
    return results


def main(argv=None) -> int:
    args = parse_args(argv, description=__doc__.splitlines()[0])
    os.makedirs(args.out, exist_ok=True)
    rank, world = 0, 1
    if args.ring:
        rank, world, device = init_ring(args.quick)
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
        fresh_caches=not args.quick, dense_compiler=args.dense_compiler,
        profile_first_step=args.profile_first_step,
    )
    write_policies(s, args.lengths, args.ring)
    results = sweep(args, s, args.backends, args.lengths)
    if rank == 0:
        print(json.dumps(results["summary"]))
    if args.ring:
        close_ring()
    return 0


if __name__ == "__main__":
    sys.exit(main())
