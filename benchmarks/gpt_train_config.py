"""The end-to-end training benchmark's sweep: its backends, command line, sizes and policies.

Everything here describes what `bench_gpt_train.py` runs: the backends of
one GPU and of the ring, the defaults of a full run and of ``--quick``, the
`Setup` every configuration shares, and the dilated policy (or eager
reference attention) of each (backend, length).
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass

import torch

from gpt_model import LONGNET_SEGMENTS, clip_patterns, dense_ring_policy, longnet_policy

SINGLE_BACKENDS = ("inductor", "dilated", "dilated_groups", "seed")
# Run only when named: the model with its attention replaced by the values (v), compiled by
# Inductor. Its step is the cost of everything but attention, so inductor's step over it is
# the most that any attention, however fast, can speed a step up.
BOUND_BACKENDS = ("no_attention",)
RING_BACKENDS = ("ring_dense", "ring_dilated")
# The head split of each dilated backend: "longnet" (every head uses every pattern, the LongNet
# paper's) and "groups" (heads split among the patterns: the same attention as the seed algorithm).
HEAD_SPLIT = {"dilated": "longnet", "dilated_groups": "groups"}
# The order the configurations run in: the targets' lengths (64k, 8k) first, then the longest
# (where the maximum context is found), then the rest; a short GPU budget then ends with what matters.
DEFAULT_LENGTHS = "64k,8k,128k,256k,32k,16k"


@dataclass(frozen=True)
class Sizes:
    """The defaults of a run: the model, the steps, the lengths and LongNet's scale."""

    layers: int
    width: int
    heads: int
    vocab: int
    steps: int
    warmup: int
    min_seq_len: int
    lengths: str
    ring_lengths: str
    segment_scale: int  # LongNet's segments (2k..32k over 8k..256k) divided by this
    targets: tuple[int, int]  # (long, short) context of the targets
    warm_compile: str


FULL = Sizes(layers=24, width=1024, heads=16, vocab=32000, steps=3, warmup=2, min_seq_len=16384,
             lengths=DEFAULT_LENGTHS, ring_lengths=DEFAULT_LENGTHS, segment_scale=1,
             targets=(65536, 8192), warm_compile="first")
# A CPU smoke run: the smallest sizes at which every kind of configuration still shows (the policy
# leaves the short context dense under min_seq_len and rewrites the long one with two patterns).
QUICK = Sizes(layers=1, width=32, heads=4, vocab=128, steps=1, warmup=1, min_seq_len=128,
              lengths="64,128", ring_lengths="128", segment_scale=64,
              targets=(128, 64), warm_compile="first")


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
    fresh_caches: bool = True  # every configuration compiles with empty caches (else they share one)
    dense_compiler: str = "inductor"  # the torch.compile backend of the `inductor` rows and the warm-up
    profile_first_step: bool = False  # record where the cold first step's host time went (cProfile)


def parse_length(text: str) -> int:
    """'8k' -> 8192, '1m' -> 1048576, '512' -> 512."""
    text = text.strip().lower()
    scale = {"k": 1024, "m": 1024**2}.get(text[-1:], 1)
    digits = text[:-1] if scale > 1 else text
    try:
        return int(digits) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad length {text!r}: write e.g. 8k, 64k or 4096") from None


def policy_for(backend: str, n: int, s: Setup) -> dict | None:
    """The policy `backend` compiles with at global length n; None for inductor, seed and
    no_attention."""
    if backend in HEAD_SPLIT:
        seg, rates = clip_patterns(s.segments, s.rates, n)
        return longnet_policy(seg, rates, s.min_seq_len, head_split=HEAD_SPLIT[backend])
    if backend == "ring_dense":
        return dense_ring_policy()
    if backend == "ring_dilated":
        chunk = n // (2 * s.world)  # zigzag: a segment must lie inside one chunk of a shard
        return longnet_policy(*clip_patterns(s.segments, s.rates, chunk), min_seq_len=0, ring=True)
    if backend in ("inductor", "seed") + BOUND_BACKENDS:
        return None
    raise ValueError(
        f"unknown backend {backend!r}: expected one of {SINGLE_BACKENDS + BOUND_BACKENDS + RING_BACKENDS}"
    )


def expected_attention(backend: str, n: int, s: Setup) -> tuple[list[int], list[int], str] | None:
    """The dilated (segments, rates, head split) `backend` computes at global length n; None for dense."""
    if backend in HEAD_SPLIT and n >= s.min_seq_len:
        return (*clip_patterns(s.segments, s.rates, n), HEAD_SPLIT[backend])
    if backend == "ring_dilated":
        return (*clip_patterns(s.segments, s.rates, n // (2 * s.world)), "longnet")
    return None


def write_policies(s: Setup, lengths: list[int], ring: bool) -> None:
    """The policies of the run, as the backend gets them, for the record."""
    if s.rank:
        return
    for n in lengths:
        for backend in RING_BACKENDS if ring else tuple(HEAD_SPLIT):
            with open(os.path.join(s.out, f"policy_{backend}_{n}.json"), "w") as f:
                json.dump(policy_for(backend, n, s), f, indent=1)


def parse_args(argv=None, description: str = "") -> argparse.Namespace:
    """The command line of bench_gpt_train.py, with the defaults of a full or a --quick run filled in."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--out", required=True, help="folder for the JSON and the policies")
    p.add_argument("--lengths", default=None,
                   help=f"comma list, e.g. 8k,16k,32k (default 8k..256k; quick {QUICK.lengths}, "
                        f"with --ring {QUICK.ring_lengths})")
    p.add_argument("--backends", default=None,
                   help=f"comma list of {SINGLE_BACKENDS + BOUND_BACKENDS} (or {RING_BACKENDS} with --ring)")
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--heads", type=int, default=None)
    p.add_argument("--vocab", type=int, default=None)
    p.add_argument("--steps", type=int, default=None,
                   help=f"timed steps, median reported (default {FULL.steps}; quick {QUICK.steps})")
    p.add_argument("--warmup", type=int, default=None,
                   help=f"untimed steps, the first (compiling) one included (default {FULL.warmup}; "
                        f"quick {QUICK.warmup})")
    p.add_argument("--min-seq-len", type=int, default=None,
                   help=f"the dilated policy's min_seq_len: shorter contexts stay dense (default "
                        f"{FULL.min_seq_len}; quick {QUICK.min_seq_len})")
    p.add_argument("--time-budget-s", type=float, default=420.0,
                   help="start no configuration that is estimated to end after this many seconds")
    p.add_argument("--check-loss", action=argparse.BooleanOptionalAction, default=None,
                   help="record the first loss of an eager single-process run of the same attention "
                        "(reference_first_loss) next to each configuration's (default: on with --quick)")
    p.add_argument("--checkpoint", action="store_true",
                   help="activation checkpointing of every block (memory O(N) per model, not per layer)")
    p.add_argument("--warm-compile", choices=("all", "first", "none"), default=None,
                   help="at which lengths to measure the warm compile time: all, the first length of "
                        "--lengths, or none (default first)")
    p.add_argument("--dense-compiler", choices=("inductor", "aot_eager", "eager"), default="inductor",
                   help="the torch.compile backend of the dense `inductor` rows (default inductor; the "
                        "others make a smoke run of the harness: the `dilated` rows follow "
                        "DILATED_COMPILER the same way)")
    p.add_argument("--profile-first-step", action="store_true",
                   help="profile each configuration's cold first step with cProfile and record its "
                        "top functions in the row (first_step_profile); its times then include the "
                        "profiler's overhead")
    p.add_argument("--ring", action="store_true", help="sequence parallel over torchrun's ranks (ring backends)")
    p.add_argument("--quick", action="store_true",
                   help=f"CPU smoke run: a {QUICK.layers}-layer width-{QUICK.width} model, lengths "
                        f"{QUICK.lengths}, the configurations sharing one compile cache")
    args = p.parse_args(argv)
    d = QUICK if args.quick else FULL
    args.steps = args.steps or d.steps
    args.warmup = args.warmup or d.warmup
    if args.steps < 1 or args.warmup < 1:
        p.error("--steps and --warmup must be at least 1 (the first warm-up step is the compiling one)")
    args.layers = args.layers or d.layers
    args.width = args.width or d.width
    args.heads = args.heads or d.heads
    args.vocab = args.vocab or d.vocab
    args.min_seq_len = args.min_seq_len if args.min_seq_len is not None else d.min_seq_len
    lengths = args.lengths or (d.ring_lengths if args.ring else d.lengths)
    args.lengths = [parse_length(x) for x in lengths.split(",") if x.strip()]
    default_backends = RING_BACKENDS if args.ring else SINGLE_BACKENDS
    args.backends = [b.strip() for b in (args.backends or ",".join(default_backends)).split(",") if b.strip()]
    allowed = RING_BACKENDS if args.ring else SINGLE_BACKENDS + BOUND_BACKENDS
    for b in args.backends:
        if b not in allowed:
            p.error(f"--backends: {b!r} is not one of {', '.join(allowed)}" + (" (with --ring)" if args.ring else ""))
    # segments scale with the lengths in quick mode
    args.segments = tuple(w // d.segment_scale for w in LONGNET_SEGMENTS)
    args.target_long, args.target_short = d.targets
    args.warm_compile = args.warm_compile or d.warm_compile
    return args
