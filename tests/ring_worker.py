"""One rank of a multi-process ring-attention test run (gloo on CPU, or NCCL on GPUs).

    python -m tests.ring_worker --rank R --world W --store FILE --out DIR [--only NAME ...]
                                [--backend gloo|nccl]

Every rank runs every case of `cases(world)` in the same order (a case may
use collectives, so all ranks must take part in each), catching failures, and
writes ``DIR/rank<R>.json``: ``{"results": {case: null | "failure text"},
"current": case being run, "seconds": {case: run time}}``, rewritten as each case starts so a hang shows
where it stopped. `tests/test_ring.py` launches the ranks, bounds their run
time and turns the results into one pytest test per case.

``--backend nccl`` (`tests/test_ring_nccl.py`): rank R uses ``cuda:R`` and
every case makes its tensors there (`ring_common.DEVICE`, set by `configure`); inputs
are still drawn on the CPU (the same values as on gloo) and the float64
references run on the CPU. NCCL runs more cases than gloo (`cases`): bf16
for every inner attention, layout and causality (the cuDNN/flash kernels),
a few fp16 ones and bf16 cases through the backend.

The cases are grouped by kind: `tests/ring_common.py` (what they share, and the numeric
case of each inner attention), `tests/ring_compiled_cases.py` (through torch.compile and
the backend), `tests/ring_shard_local_cases.py` (attention that no ring covers) and
`tests/ring_training_cases.py` (the example model); here are the eager special cases, the
bad setups, `cases` and the entry point.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import sys
from typing import Callable

import torch
import torch.distributed as dist

from dilated_compile import register_group, ring_attention
from dilated_compile.backend import compiler_from
from dilated_compile.sharding import check_same_on_all_ranks, ring_info, shard, unshard

from . import ring_common
from .launcher import RankResults
from .ring_common import (
    BATCH, BLOCK_SPARSE, DILATED, HEADS, N_LOCAL, CaseFailure, _compare, _full_inputs, _local_qkv, _reference,
    expect_error, numeric_case,
)
from .ring_compiled_cases import (
    EXCHANGED, ROTATE, backend_case, bad_backend_policy, bad_backend_ring_site_left, bad_dynamic_lengths_differ,
    bad_dynamic_zigzag_odd, compiled_case, dynamic_backend_case,
)
from .ring_shard_local_cases import shard_local_cases
from .ring_training_cases import gpt_training_case, gpt_training_inner_case
from .ring_window_cases import window_cases

# ---------------------------------------------------------------------------
# the kernels on CUDA


def cuda_kernels_case() -> None:
    """On CUDA the cases' dense blocks run the fused kernels (not the math fallback): cuDNN or
    flash for bfloat16 and float16, efficient for float32 (DIM is CUDA_DIM there)."""
    from dilated_compile.lowering.common.block_kernels import choose_kernel

    want = {torch.bfloat16: ("cudnn", "flash"), torch.float16: ("cudnn", "flash"), torch.float32: ("efficient",)}
    for dtype, kernels in want.items():
        q = _local_qkv(N_LOCAL, dtype)[0]
        if choose_kernel(q) not in kernels:
            raise CaseFailure(f"{dtype} blocks of shape {tuple(q.shape)} run {choose_kernel(q)!r}, want {kernels}")


# ---------------------------------------------------------------------------
# sharding helpers, groups, world-size-1 behaviour


def split_boxes_case(layout: str, is_causal: bool, setup: str) -> None:
    """numeric_case of a block-sparse ring whose shard pairs are split into several boxes
    (MAX_BOX_PAIRS lowered; only mask_mod patterns split): several masked calls per step,
    merged in the forward and summed in the backward."""
    from dilated_compile.lowering.ring import block_sparse as ring_block_sparse

    saved = ring_block_sparse.MAX_BOX_PAIRS
    ring_block_sparse.MAX_BOX_PAIRS = 4
    try:
        numeric_case("block_sparse", layout, is_causal, torch.float32, setup, n_local=12)
    finally:
        ring_block_sparse.MAX_BOX_PAIRS = saved


def first_hop_exact_case(layout: str, dtype: torch.dtype) -> None:
    """The ring backward's first gradient hop in the inputs' dtype (half the bytes of float32)
    gives the same gradients, bit for bit, as sending it in float32."""
    from dilated_compile.lowering.ring import dense as ring_dense

    world, _, _ = ring_info()
    q, k, v, dout = _full_inputs(world, 16, dtype, seed=7)
    grads = []
    for hop in ("input dtype", "float32"):
        local = [shard(t, 2, layout).clone().requires_grad_() for t in (q, k, v)]
        original = ring_dense.Schedule.first_accumulator_dtype
        if hop == "float32":
            ring_dense.Schedule.first_accumulator_dtype = lambda self, kv_dtype, acc_dtype: acc_dtype
        try:
            ring_attention(*local, layout=layout, is_causal=True).backward(shard(dout, 2, layout))
        finally:
            ring_dense.Schedule.first_accumulator_dtype = original
        grads.append([t.grad for t in local])
    for name, a, b in zip("qkv", *grads):
        if not torch.equal(a, b):
            raise CaseFailure(f"grad {name}: the {dtype} first hop differs from the float32 one by "
                              f"{(a.double() - b.double()).abs().max().item():.3g}")


def shard_roundtrip_case(layout: str) -> None:
    """unshard(shard(x)) == x along any dim; shard picks the layout's positions; grads flow."""
    world, rank, _ = ring_info()
    x = torch.arange(3 * 4 * world * 2, device=ring_common.DEVICE).reshape(3, 4 * world * 2)
    pieces = shard(x, 1, layout)
    n = x.shape[1] // (2 * world)
    expected_cols = (
        list(range(rank * 2 * n, (rank + 1) * 2 * n)) if layout == "contiguous"
        else list(range(rank * n, (rank + 1) * n)) + list(range((2 * world - 1 - rank) * n, (2 * world - rank) * n))
    )
    if not torch.equal(pieces, x[:, expected_cols]):
        raise CaseFailure(f"shard picked {pieces[0].tolist()}, expected columns {expected_cols}")
    if not torch.equal(unshard(pieces, 1, layout), x):
        raise CaseFailure("unshard(shard(x)) != x")
    y = torch.randn(2, x.shape[1], 3, generator=torch.Generator().manual_seed(1)).to(ring_common.DEVICE)
    local = shard(y, -2, layout).clone().requires_grad_()
    weights = torch.arange(y.numel(), device=ring_common.DEVICE).reshape(y.shape)
    (unshard(local, -2, layout) * weights).sum().backward()
    want = shard(weights.float(), -2, layout)
    if not torch.allclose(local.grad, want):
        raise CaseFailure("unshard's gradient is not this rank's shard of the output gradient")


def subgroup_case() -> None:
    """A ring over a registered subgroup (ranks 0 and 1) matches the reference there."""
    world, rank, _ = ring_info()
    pair = dist.new_group([0, 1])  # every rank must call new_group
    register_group("pair", pair)  # on every rank, with what new_group returned there
    if rank >= 2:
        try:
            ring_info("pair")
        except ValueError as e:
            if "not a member" not in str(e):
                raise CaseFailure(f"unexpected message for a non-member: {e}") from e
            return
        raise CaseFailure("ring_info('pair') on a non-member did not raise")
    if ring_info("pair")[:2] != (2, rank):
        raise CaseFailure(f"ring_info('pair') = {ring_info('pair')}")
    q, k, v, dout = _full_inputs(2, N_LOCAL, torch.float64, seed=3)
    local = [shard(t, 2, "zigzag", group="pair").clone().requires_grad_() for t in (q, k, v)]
    out = ring_attention(*local, layout="zigzag", group="pair", is_causal=True)
    out.backward(shard(dout, 2, "zigzag", group="pair"))
    ref_out, *grads = _reference("dense", "groups", True, q, k, v, dout)
    _compare("output", out, shard(ref_out, 2, "zigzag", group="pair"), 1e-12)
    for name, t, ref in zip("qkv", local, grads):
        _compare(f"grad {name}", t.grad, shard(ref, 2, "zigzag", group="pair"), 1e-12)


# ---------------------------------------------------------------------------
# bad setups: the same error on every rank, no hang


def bad_shard_lengths() -> None:
    _, rank, _ = ring_info()
    qkv = _local_qkv(8 if rank == 0 else 10)
    shapes = tuple(f"({BATCH}, {HEADS}, {n}, {ring_common.DIM})" for n in (8, 10))
    expect_error(ValueError, ("differs between ranks", "rank 0", "rank 1", *shapes),
                 lambda: ring_attention(*qkv, is_causal=True))


def bad_zigzag_odd() -> None:
    qkv = _local_qkv(7)
    expect_error(ValueError, ("zigzag", "7 positions", "odd"), lambda: ring_attention(*qkv, layout="zigzag"))


def bad_policy_digest() -> None:
    _, rank, _ = ring_info()
    digest = "abc" if rank != 1 else "abd"
    expect_error(ValueError, ("policy digest differs between ranks", "rank 1: 'abd'", "[1]"),
                 lambda: check_same_on_all_ranks(digest, "policy digest"))


def bad_block_sparse_pattern() -> None:
    """Ranks passing different block-sparse patterns: the same error on every rank."""
    _, rank, _ = ring_info()
    qkv = _local_qkv(8)
    pattern = {"kind": "local_window", "window": 1 if rank == 0 else 2}
    expect_error(ValueError, ("differs between ranks", "local_window(window=1)", "local_window(window=2)"),
                 lambda: ring_attention(*qkv, inner="block_sparse", block_size=4, pattern=pattern))


def bad_dilated_rates() -> None:
    """Ranks passing different dilation rates: the same error on every rank, no hang."""
    _, rank, _ = ring_info()
    qkv = _local_qkv(8)
    rates = (1, 2) if rank == 0 else (1, 4)
    expect_error(ValueError, ("differs between ranks", "(1, 2)", "(1, 4)"),
                 lambda: ring_attention(*qkv, inner="dilated", segment_lengths=(4, 16), dilation_rates=rates))


def bad_group_name() -> None:
    qkv = _local_qkv(8)
    expect_error(ValueError, ("'nope'", "register_group"), lambda: ring_attention(*qkv, group="nope"))


def bad_shard_length() -> None:
    world, _, _ = ring_info()
    x = torch.zeros(2, 2 * world + 1, device=ring_common.DEVICE)
    expect_error(ValueError, ("does not shard evenly", f"multiple of {2 * world}"), lambda: shard(x, 1, "zigzag"))


# ---------------------------------------------------------------------------


# names of the cases that run torch.compile (Dynamo, and Inductor for most): the slow part of a run
COMPILING_PREFIXES = ("backend-", "compiled-", "dynamic-", "bad-dynamic-", "bad-backend-", "gpt-training-backend")


def compiles(name: str) -> bool:
    """Whether case `name` compiles (tests/test_ring_nccl.py marks and launches these apart)."""
    return name.startswith(COMPILING_PREFIXES)


def cases(world: int, backend: str = "gloo") -> dict[str, Callable[[], None]]:
    """Every case run for `world` ranks over `backend`, by name (the same order on every rank).

    NCCL (CUDA tensors) runs every gloo case and more: bfloat16 for every inner attention,
    setup, layout and causality (the cuDNN/flash kernels compute the dense blocks), a few
    float16 ones, and (world size 2) bfloat16 through the backend.
    """
    gpu = backend == "nccl"
    out: dict[str, Callable[[], None]] = {}
    if gpu:
        out["cuda-kernels"] = cuda_kernels_case
    for layout in ("contiguous", "zigzag"):
        for causal in (False, True):
            tag = f"{layout}-{'causal' if causal else 'full'}"
            for dtype in (torch.float32, torch.bfloat16) if gpu else (torch.float32,):
                kw = {} if dtype == torch.float32 else {"n_local": 32}
                name = str(dtype).removeprefix("torch.")
                out[f"dense-{tag}-{name}"] = functools.partial(numeric_case, "dense", layout, causal, dtype, **kw)
                for setup in DILATED:
                    out[f"dilated-{setup}-{tag}-{name}"] = functools.partial(
                        numeric_case, "dilated", layout, causal, dtype, setup, **kw)
                for setup in BLOCK_SPARSE:
                    out[f"block-sparse-{setup}-{tag}-{name}"] = functools.partial(
                        numeric_case, "block_sparse", layout, causal, dtype, setup, **kw)
        out[f"dense-{layout}-causal-float64"] = functools.partial(
            numeric_case, "dense", layout, True, torch.float64)
        # half precision, one setup per inner kind: bfloat16 on gloo (on NCCL every setup runs
        # in bfloat16 above), float16 on NCCL
        half, setups = (torch.float16, ("longnet-long", "global")) if gpu else (
            torch.bfloat16, ("groups-long", "local"))
        name = str(half).removeprefix("torch.")
        out[f"dense-{layout}-causal-{name}"] = functools.partial(
            numeric_case, "dense", layout, True, half, n_local=32)
        for inner, setup in zip(("dilated", "block_sparse"), setups):
            out[f"{inner.replace('_', '-')}-{setup}-{layout}-causal-{name}"] = functools.partial(
                numeric_case, inner, layout, True, half, setup, n_local=32)
        out[f"shard-roundtrip-{layout}"] = functools.partial(shard_roundtrip_case, layout)
        for causal, setup in ((True, "mask-mod"), (False, "mask-mod")):
            out[f"block-sparse-split-{setup}-{layout}-{'causal' if causal else 'full'}"] = functools.partial(
                split_boxes_case, layout, causal, setup)
        out[f"first-hop-exact-{layout}-{name}"] = functools.partial(first_hop_exact_case, layout, half)
    out["dense-zigzag-causal-float64-long"] = functools.partial(
        numeric_case, "dense", "zigzag", True, torch.float64, n_local=34)
    out["gpt-training-direct"] = functools.partial(gpt_training_case, "direct")
    # Inductor compiles are the slow part of a run and do not depend on the world size (the eager
    # cases above cover every hop count): the backend cases through Inductor run on 2 ranks; the
    # others run with DILATED_COMPILER (the suite: as captured), and AOTAutograd's trace
    # of each ring is read by the compiled-capture cases
    as_captured = {"compiler": compiler_from({})}
    if world == 2:
        out["backend-dense-zigzag-causal"] = functools.partial(backend_case, "dense", "zigzag", True)
        out["backend-dilated-zigzag-causal"] = functools.partial(  # segments inside a chunk
            backend_case, "dilated", "zigzag", True, sends=False, **as_captured)
        # segments spanning ranks: the ring sends (the dense case checks the collectives in
        # Inductor's code)
        out["backend-dilated-groups-long-zigzag-causal"] = functools.partial(
            backend_case, "dilated", "zigzag", True, "groups-long", **as_captured)
        # the compiled capture of the same ring below counts its all-to-alls
        out["backend-block-sparse-local-contiguous-causal"] = functools.partial(
            backend_case, "block_sparse", "contiguous", True, "local", keys=EXCHANGED, **as_captured)
    if world == 3:
        out["backend-dense-contiguous-full"] = functools.partial(
            backend_case, "dense", "contiguous", False, **as_captured)
        out["backend-block-sparse-mask-mod-zigzag-full"] = functools.partial(
            backend_case, "block_sparse", "zigzag", False, "mask-mod", keys=ROTATE, **as_captured)
    if world == 4:
        out["backend-dilated-longnet-contiguous-full"] = functools.partial(
            backend_case, "dilated", "contiguous", False, "longnet", sends=False,
            keys="none sent (segments inside a shard)", **as_captured)
        out["backend-block-sparse-global-zigzag-causal"] = functools.partial(  # one all-to-all
            backend_case, "block_sparse", "zigzag", True, "global", keys=EXCHANGED, **as_captured)
    if gpu and world == 2:  # cuDNN/flash inside the compiled ring; with the float32 cases above,
        # every inner attention through the backend in both layouts, causal and not
        bf16 = dict(dtype=torch.bfloat16, n_local=32)
        out["backend-dense-zigzag-causal-bfloat16"] = functools.partial(
            backend_case, "dense", "zigzag", True, **bf16)
        out["backend-dilated-groups-long-contiguous-full-bfloat16"] = functools.partial(  # longnet-long:
            backend_case, "dilated", "contiguous", False, "groups-long", **bf16)  # twice the compile time
        out["backend-block-sparse-global-zigzag-full-bfloat16"] = functools.partial(
            backend_case, "block_sparse", "zigzag", False, "global", **bf16)
    if world == 2:
        out["gpt-training-backend"] = functools.partial(gpt_training_case, "backend")
        out["gpt-training-backend-dilated-long"] = functools.partial(
            gpt_training_inner_case, "dilated", "groups-long")
    if world == 3:
        out["gpt-training-backend-block-sparse"] = functools.partial(
            gpt_training_inner_case, "block_sparse", "global")
    if world == 2:
        out["compiled-capture-zigzag-causal"] = functools.partial(compiled_case, "zigzag", True, "capture")
        out["compiled-capture-contiguous-causal"] = functools.partial(compiled_case, "contiguous", True, "capture")
        out["compiled-inductor-zigzag-causal"] = functools.partial(compiled_case, "zigzag", True, "inductor")
    if world == 3:  # send-only ranks at several steps
        out["compiled-capture-contiguous-causal"] = functools.partial(compiled_case, "contiguous", True, "capture")
    if world == 2:
        out["compiled-capture-dilated-long-zigzag-causal"] = functools.partial(
            compiled_case, "zigzag", True, "capture", "dilated", "groups-long")
        out["compiled-capture-block-sparse-contiguous-causal"] = functools.partial(
            compiled_case, "contiguous", True, "capture", "block_sparse", "local", exchanged=True)
    if gpu and world == 2:  # the cuDNN/flash blocks' path (float32 runs the efficient kernel)
        out["compiled-capture-zigzag-causal-bfloat16"] = functools.partial(
            compiled_case, "zigzag", True, "capture", dtype=torch.bfloat16)
        out["compiled-inductor-zigzag-causal-bfloat16"] = functools.partial(
            compiled_case, "zigzag", True, "inductor", dtype=torch.bfloat16)
    if world >= 3:
        out["subgroup"] = subgroup_case
    # dynamic (symbolic) lengths: the ring custom op, one graph for all lengths
    if world == 2:
        out["dynamic-dense-zigzag-causal"] = functools.partial(
            dynamic_backend_case, "dense", "zigzag", True, "", (6, 10, 14), min_seq_len=16)
        out["dynamic-dilated-groups-zigzag-causal"] = functools.partial(  # segments inside a chunk
            dynamic_backend_case, "dilated", "zigzag", True, "groups", (8, 16))
        out["dynamic-dilated-groups-long-contiguous-causal"] = functools.partial(  # spanning, ragged
            dynamic_backend_case, "dilated", "contiguous", True, "groups-long", (8, 10, 13))
        out["dynamic-block-sparse-local-contiguous-causal"] = functools.partial(
            dynamic_backend_case, "block_sparse", "contiguous", True, "local", (5, 8))
    if world == 3:
        out["dynamic-dilated-longnet-long-zigzag-full"] = functools.partial(
            dynamic_backend_case, "dilated", "zigzag", False, "longnet-long", (6, 10))
    if world == 2:  # a mask_mod pattern's function travels to the op as its import path
        out["dynamic-block-sparse-mask-mod-contiguous-full"] = functools.partial(
            dynamic_backend_case, "block_sparse", "contiguous", False, "mask-mod", (8, 10))
    if world in (2, 3):
        out["bad-dynamic-zigzag-odd"] = bad_dynamic_zigzag_odd
        out["bad-dynamic-lengths-differ"] = bad_dynamic_lengths_differ
    out.update(window_cases(world, ring_common.DEVICE))  # sliding-window masks (tests/ring_window_cases.py)
    for fn in (bad_shard_lengths, bad_zigzag_odd, bad_policy_digest, bad_block_sparse_pattern,
               bad_dilated_rates, bad_group_name, bad_shard_length, bad_backend_policy,
               bad_backend_ring_site_left):
        out[fn.__name__.replace("_", "-")] = fn
    out.update(shard_local_cases(world))
    return out


def configure(backend: str, rank: int) -> None:
    """Where this rank's cases run: the CPU for gloo; for NCCL cuda:<rank> (made the current
    device, as NCCL's object collectives need) with head_dim CUDA_DIM."""
    if backend == "nccl":  # set where the cases read them (tests/ring_common.py)
        ring_common.DEVICE = torch.device("cuda", rank)
        torch.cuda.set_device(ring_common.DEVICE)
        ring_common.DIM = ring_common.CUDA_DIM


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--world", type=int, required=True)
    parser.add_argument("--store", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--only", nargs="*")
    parser.add_argument("--backend", choices=("gloo", "nccl"), default="gloo")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    configure(args.backend, args.rank)
    dist.init_process_group(
        args.backend, init_method=f"file://{args.store}", rank=args.rank, world_size=args.world,
        timeout=datetime.timedelta(seconds=60),  # NCCL: its watchdog aborts the rank past this
    )
    results = RankResults(args.out, args.rank)
    for name, fn in cases(args.world, args.backend).items():
        if not args.only or name in args.only:
            results.run(name, fn)
    results.finish()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
