"""Ring attention on several GPUs of one host: scaling efficiency against one GPU.

Launch with one process per GPU; one call runs the whole sweep and rank 0
writes ring.json into --out:

    torchrun --nproc-per-node 2 benchmarks/bench_ring.py --out $OUT [--per-rank 8192 16384 ...]

For each number of tokens per rank n (total N = W n), bf16, B=1, H=16, D=128,
causal, zigzag layout, it measures in the same run, forward and
forward+backward:

- ``single``: dense causal SDPA on the full N on one GPU (every rank runs it
  on its own GPU at the same time; the slowest counts) - the baseline;
- ``ours_eager``: `dilated_compile.ring_attention` (dense inner, zigzag);
- ``ours_compiled``: a module calling SDPA, compiled with backend="dilated"
  and a ring policy (the collectives are in the compiled graph);
- ``cp_allgather`` / ``cp_alltoall``: torch's `context_parallel` with each of
  its rotate methods (its default load balancing).

torch 2.11 caches cuDNN's backward graphs by the q/k/v layout alone and bakes
in the output, grad_output and log-sum-exp strides of the call that built
the graph (later torch adds them to the key). `context_parallel` calls it with
other strides than our rings for the same q/k/v, and whichever side runs
second reads with the other's strides: an illegal memory access in our
compiled ring's backward after the `context_parallel` runs. So the sweep runs
`context_parallel` in a process of its own (``--cp only``, its own one-GPU
baseline) and the main run takes its rows from that file (``--cp-from``):

    torchrun --nproc-per-node 2 benchmarks/bench_ring.py --cp only --out $OUT
    torchrun --nproc-per-node 2 benchmarks/bench_ring.py --cp-from $OUT/ring_w2_cp.json --dilated --out $OUT

Efficiency = (single / W) / ring time (1.0 = perfect scaling). With
``--dilated`` it also times, as useful forward TFLOP/s per GPU against the
same attention over the full sequence on one GPU:

- ``dilated``: segments 2048/4096/8192, rates 1/2/4, inside a zigzag chunk
  (nothing sent);
- ``dilated_long``: segments n/2, n, 2n, rates 1/2/4, for n tokens per rank
  (selected keys sent between ranks);
- ``block_sparse``: a causal local window (blocks of 128, window 2), up to
  ``--max-block-sparse`` tokens per rank.

Each of these runs as `ring_attention` (eager, ``ring``) and, up to
``--max-compiled-inner`` tokens per rank, through the backend with the same
attention in a ring policy (``ring_compiled``; compile time apart).
``--inner-only`` leaves out the dense rows (one GPU's causal SDPA, the dense
rings, ``context_parallel``).

Ranks time with CUDA events over a fixed number of iterations (every rank
runs the same collectives the same number of times), after a barrier; the
slowest rank's time counts. Compile time is measured separately (first call).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import dilated_compile  # noqa: E402
from dilated_compile import dilated_attention, ring_attention, shard  # noqa: E402

DILATED = ([2048, 4096, 8192], [1, 2, 4])  # segments inside a zigzag chunk from 16k tokens per rank
BLOCK_SPARSE = (128, {"kind": "local_window", "window": 2})


class CausalSDPA(nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def slowest(ms: float) -> float:
    t = torch.tensor([ms], device="cuda")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def time_ms(fn, iters: int, warmup: int) -> float:
    """Milliseconds per call of fn on every rank (the slowest rank's)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    dist.barrier()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return slowest(start.elapsed_time(end) / iters)


def with_backward(f, inputs, grad):
    def step():
        for t in inputs:
            t.grad = None
        f(*inputs).backward(grad)

    return step


def first_call_s(fn) -> float:
    dist.barrier()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return slowest(time.perf_counter() - t0)


def causal_flops(n_total: int, h: int, d: int) -> float:
    return 4 * d * h * n_total * (n_total + 1) / 2


def measure(name, fn, inputs, grad, iters, row, rank):
    """fwd and fwd+bwd times of fn into row[name]; errors are recorded, not raised."""
    try:
        with torch.no_grad():
            fwd = time_ms(lambda: fn(*inputs), iters, 3)
        fwdbwd = time_ms(with_backward(fn, inputs, grad), iters, 2)
        row[name] = {"fwd_ms": fwd, "fwdbwd_ms": fwdbwd}
    except Exception as exc:  # noqa: BLE001 - a failing baseline is a result, not a crash
        row[name] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
        if rank == 0:
            traceback.print_exc()
    torch.cuda.synchronize()


def measure_context_parallel(mesh, rotate, full, iters, row, rank) -> None:
    """SDPA under torch's context_parallel, as its users write it: the context
    shards the full buffers in place (head-tail load balancing, the zigzag
    layout) and patches SDPA; timing runs inside it."""
    from torch.distributed.tensor.experimental import context_parallel
    from torch.distributed.tensor.experimental._attention import set_rotate_method

    name = f"cp_{rotate}"
    try:
        set_rotate_method(rotate)
        bufs = [t.clone() for t in full]
        with context_parallel(mesh, buffers=bufs, buffer_seq_dims=[2] * len(bufs), no_restore_buffers=set(bufs)):
            q, k, v = (t.requires_grad_() for t in bufs[:3])
            sdpa = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)  # noqa: E731
            measure(name, sdpa, (q, k, v), bufs[3], iters, row, rank)
    except Exception as exc:  # noqa: BLE001
        row[name] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
        if rank == 0:
            traceback.print_exc()


def check_against_single_gpu(h: int, d: int, per_rank: int = 2048) -> dict:
    """Relative error of the ring's output and input gradients (bf16) against
    float32 SDPA on the full sequence on one GPU, restricted to this rank."""
    world = dist.get_world_size()
    g = torch.Generator(device="cuda").manual_seed(1)
    full = [torch.randn(1, h, per_rank * world, d, device="cuda", generator=g) for _ in range(4)]
    ref_in = [t.clone().requires_grad_() for t in full[:3]]
    F.scaled_dot_product_attention(*ref_in, is_causal=True).backward(full[3])
    ref_out = F.scaled_dot_product_attention(*[t.detach() for t in ref_in], is_causal=True)
    want = [shard(t, 2, "zigzag") for t in (ref_out, *[t.grad for t in ref_in])]
    local = [shard(t, 2, "zigzag").to(torch.bfloat16).contiguous().requires_grad_() for t in full[:3]]
    out = ring_attention(*local, layout="zigzag", is_causal=True)
    out.backward(shard(full[3], 2, "zigzag").to(torch.bfloat16))
    got = [out, *[t.grad for t in local]]
    errors = {}
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        err = ((a.float() - b).norm() / b.norm()).reshape(1)
        dist.all_reduce(err, op=dist.ReduceOp.MAX)
        errors[name] = float(err.item())
    return errors


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--per-rank", type=int, nargs="+", default=[8192, 16384, 32768, 65536])
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--dilated", action="store_true",
                   help="also dilated (segments inside a shard, and spanning ranks) and block-sparse rings")
    p.add_argument("--max-block-sparse", type=int, default=1 << 20,
                   help="largest tokens per rank for the block-sparse ring")
    p.add_argument("--max-compiled-inner", type=int, default=1 << 20,
                   help="largest tokens per rank for the compiled dilated and block-sparse rings")
    p.add_argument("--inner-only", action="store_true",
                   help="only the dilated and block-sparse rows (implies --dilated)")
    p.add_argument(
        "--cp", choices=("run", "skip", "only"), default="skip",
        help="torch's context_parallel: measured in this run, not at all, or alone (see above)",
    )
    p.add_argument("--cp-from", help="a `--cp only` run's JSON: its context_parallel rows join this run's")
    p.add_argument("--out", default=os.environ.get("OUT", "out"))
    args = p.parse_args()
    args.dilated |= args.inner_only

    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    torch._dynamo.config.cache_size_limit = 256
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cuda", (world,))
    h, d = args.heads, args.head_dim
    results = {
        "device": torch.cuda.get_device_name(), "torch": torch.__version__, "world_size": world,
        "dtype": "bfloat16", "batch": 1, "heads": h, "head_dim": d, "causal": True, "layout": "zigzag",
        "rows": [],
    }
    path = os.path.join(args.out, f"ring_w{world}{'_cp' if args.cp == 'only' else ''}.json")
    cp_rows = {}
    if args.cp_from:
        with open(args.cp_from) as f:
            cp_rows = {r["per_rank"]: r for r in json.load(f)["rows"]}
    if args.cp != "only" and not args.inner_only:  # the ring's numbers (not needed by a context_parallel-only run)
        results["check_rel_error_vs_fp32"] = check_against_single_gpu(h, d)
        if rank == 0:
            print("check (relative error of bf16 ring vs fp32 single GPU):", results["check_rel_error_vs_fp32"],
                  flush=True)
    policy = {"version": 1, "rules": [{"match": "**", "attention": "dense", "ring": {"layout": "zigzag"}}]}
    ours = args.cp != "only"
    for n in args.per_rank:
        total = n * world
        g = torch.Generator(device="cuda").manual_seed(total)
        full = [torch.randn(1, h, total, d, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(4)]
        row = {"per_rank": n, "N": total, "flops_fwd": causal_flops(total, h, d)}
        # the baseline: the whole sequence on one GPU
        if not args.inner_only:
            single = [t.clone().requires_grad_() for t in full[:3]]
            measure("single", lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
                    single, full[3], max(3, args.iters // 2), row, rank)
            del single
        if args.cp in ("run", "only") and not args.inner_only:
            for rotate in ("allgather", "alltoall"):
                measure_context_parallel(mesh, rotate, full, args.iters, row, rank)
        if ours:
            local = [shard(t, 2, "zigzag").contiguous().requires_grad_() for t in full[:3]]
            dout = shard(full[3], 2, "zigzag").contiguous()
        del full
        torch.cuda.empty_cache()
        if ours and not args.inner_only:
            ring = lambda q, k, v: ring_attention(q, k, v, layout="zigzag", is_causal=True, check=False)  # noqa: E731
            measure("ours_eager", ring, local, dout, args.iters, row, rank)
            torch._dynamo.reset()
            compiled = torch.compile(CausalSDPA(), backend="dilated", options={"policy": policy})
            row["ours_compiled_compile_fwd_s"] = first_call_s(lambda: compiled(*[t.detach() for t in local]))
            row["ours_compiled_compile_fwdbwd_s"] = first_call_s(lambda: compiled(*local).backward(dout))
            measure("ours_compiled", compiled, local, dout, args.iters, row, rank)
        for name in ("ours_eager", "ours_compiled", "cp_allgather", "cp_alltoall"):
            if name in row and "error" not in row[name] and "error" not in row.get("single", {"error": 1}):
                for mode in ("fwd", "fwdbwd"):
                    row[name][f"{mode}_efficiency"] = row["single"][f"{mode}_ms"] / world / row[name][f"{mode}_ms"]
        for name in ("cp_allgather", "cp_alltoall"):
            if n in cp_rows and name in cp_rows[n]:  # measured in its own process, against its own baseline
                row[name] = {**cp_rows[n][name], "own_process": True}
        if ours and args.dilated:
            inner_rows(row, local, dout, world, rank, args)
        results["rows"].append(row)
        if rank == 0:
            print(json.dumps(row), flush=True)
            os.makedirs(args.out, exist_ok=True)
            with open(path, "w") as f:
                json.dump(results, f, indent=1)
        if ours:
            del local, dout
        torch.cuda.empty_cache()
    if rank == 0:
        print("wrote", path)
    dist.destroy_process_group()


def block_sparse_pairs(n: int, block: int, pattern: dict, is_causal: bool) -> int:
    """(query, key) pairs a block-sparse pattern lets attend over n positions (n a multiple of
    block): whole active blocks, the diagonal ones halved by causality."""
    from dilated_compile.lowering.block_sparse.patterns import as_pattern, blocks_active

    idx = torch.arange(n // block)
    active = blocks_active(as_pattern(pattern, block), idx[:, None], idx[None, :])
    if not is_causal:
        return int(active.sum()) * block * block
    below = active & (idx[None, :] < idx[:, None])
    return int(below.sum()) * block * block + int(active.diagonal().sum()) * block * (block + 1) // 2


def inner_setups(n: int, world: int, h: int, d: int, max_block_sparse: int) -> dict:
    """By row key: (description, one-GPU fn, ring fn, the ring's policy rule, useful forward
    FLOPs) of the non-dense inner attentions, or a reason to skip, for n tokens per rank
    (causal, zigzag)."""
    from dilated_compile import block_sparse_attention
    from dilated_compile.cost import dilated_cost

    out = {}
    total = n * world
    for key, (seg, rates) in (("dilated", DILATED), ("dilated_long", ([n // 2, n, 2 * n], [1, 2, 4]))):
        if key == "dilated" and (n // 2) % max(seg):
            out[key] = f"segment {max(seg)} does not divide the zigzag chunk {n // 2}"
            continue
        cost = dilated_cost(1, h, d, seg, rates, head_split="groups", is_causal=True, dtype_bytes=2)
        out[key] = (
            {"segments": seg, "rates": rates},
            lambda q, k, v, seg=seg, rates=rates: dilated_attention(q, k, v, seg, rates, is_causal=True),
            lambda q, k, v, seg=seg, rates=rates: ring_attention(
                q, k, v, inner="dilated", layout="zigzag", is_causal=True, segment_lengths=seg,
                dilation_rates=rates, check=False),
            {"attention": "dilated", "segment_lengths": seg, "dilation_rates": rates, "head_split": "groups"},
            float(cost.at(total)[0]),
        )
    block, pattern = BLOCK_SPARSE
    if n > max_block_sparse:
        out["block_sparse"] = f"above --max-block-sparse {max_block_sparse} tokens per rank"
    else:
        out["block_sparse"] = (
            {"block_size": block, "pattern": pattern},
            lambda q, k, v: block_sparse_attention(q, k, v, block_size=block, pattern=pattern, is_causal=True),
            lambda q, k, v: ring_attention(q, k, v, inner="block_sparse", layout="zigzag", is_causal=True,
                                           block_size=block, pattern=pattern, check=False),
            {"attention": "block_sparse", "block_size": block, "pattern": pattern},
            4.0 * d * h * block_sparse_pairs(total, block, pattern, True),
        )
    return out


def compiled_ring(rule: dict, local, dout, iters: int, one: dict, rank: int) -> None:
    """A module calling causal SDPA through the backend with `rule` as a zigzag ring: first-call
    (compile) seconds, then times, into one["ring_compiled"]."""
    policy = {"version": 1, "rules": [{"match": "**", **rule, "ring": {"layout": "zigzag"}}]}
    torch._dynamo.reset()
    compiled = torch.compile(CausalSDPA(), backend="dilated", options={"policy": policy})
    try:
        compile_fwd = first_call_s(lambda: compiled(*[t.detach() for t in local]))
        compile_fwdbwd = first_call_s(lambda: compiled(*local).backward(dout))
    except Exception as exc:  # noqa: BLE001 - a failing compile is a result
        one["ring_compiled"] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
        if rank == 0:
            traceback.print_exc()
        return
    measure("ring_compiled", compiled, local, dout, iters, one, rank)
    one["ring_compiled"].update(compile_fwd_s=compile_fwd, compile_fwdbwd_s=compile_fwdbwd)


def inner_rows(row, local, dout, world, rank, args) -> None:
    """Dilated (segments inside a shard, and spanning ranks) and block-sparse rings against the
    same attention on one GPU: time, and useful forward TFLOP/s per GPU."""
    n, h, d = row["per_rank"], args.heads, args.head_dim
    try:
        setups = inner_setups(n, world, h, d, args.max_block_sparse)
    except Exception as exc:  # noqa: BLE001 - a setup error is a result
        row["inner_error"] = f"{type(exc).__name__}: {exc}"[:300]
        return
    for key, setup in setups.items():
        if isinstance(setup, str):
            row[key] = {"skipped": setup}
            continue
        description, single_fn, ring_fn, rule, flops = setup
        full = [torch.randn(1, h, n * world, d, device="cuda", dtype=torch.bfloat16).requires_grad_()
                for _ in range(3)]
        grad = torch.randn_like(full[0])
        one = {}
        measure("single", single_fn, full, grad, args.iters, one, rank)
        del full, grad
        torch.cuda.empty_cache()
        measure("ring", ring_fn, local, dout, args.iters, one, rank)
        if n <= args.max_compiled_inner:
            compiled_ring(rule, local, dout, args.iters, one, rank)
        row[key] = {**description, **one, "flops_fwd": flops}
        for name in ("single", "ring", "ring_compiled"):
            if name not in one:
                continue
            if "error" not in one[name]:
                per_gpu = flops / (1 if name == "single" else world)
                row[key][f"{name}_fwd_tflops_per_gpu"] = per_gpu / one[name]["fwd_ms"] / 1e9
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
