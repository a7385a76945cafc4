"""The sequence-parallel side of the end-to-end training benchmark (``--ring`` under torchrun).

The process group, the zigzag shards of a batch, the gradient sum after
backward, and the per-rank measurements merged into one row. Every rank runs
the same configurations in the same order; whatever decides what runs next is
agreed on by all of them so that none waits in a collective for another.
"""

from __future__ import annotations

import datetime
import os
from typing import Any

import torch

import dilated_compile
from gpt_train_config import Setup

# per-rank measurements recorded in each ring row's "ranks"
RANK_FIELDS = ("step_ms_median", "peak_mem_gib", "cold_compile_s", "warm_compile_s", "status", "reason")


def init_ring(quick: bool) -> tuple[int, int, torch.device]:
    """Join torchrun's process group (NCCL on GPUs, gloo on CPU or with --quick): rank, world, device."""
    if "RANK" not in os.environ:
        raise SystemExit("--ring runs under torchrun: torchrun --nproc-per-node 2 benchmarks/bench_gpt_train.py --ring ...")
    use_cuda = torch.cuda.is_available() and not quick
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    torch.distributed.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(seconds=600))
    device = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")
    return torch.distributed.get_rank(), torch.distributed.get_world_size(), device


def check_length(n: int, s: Setup) -> None:
    """Stop when the zigzag layout cannot split length n over the ranks."""
    if s.world > 1 and n % (2 * s.world):
        raise SystemExit(f"length {n} is not a multiple of 2 * world size = {2 * s.world} (zigzag)")


def shard_batch(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """This rank's zigzag shard of each tensor, along its last dimension."""
    return tuple(dilated_compile.shard(t, t.dim() - 1, "zigzag") for t in tensors)


def sum_gradients(params: list[torch.Tensor]) -> None:
    """Sum every parameter's gradient over the ranks: each rank saw part of the tokens."""
    for p in params:
        torch.distributed.all_reduce(p.grad)


def sum_losses(losses: torch.Tensor) -> torch.Tensor:
    """The global losses: each rank's loss is its shard's part of the global mean."""
    torch.distributed.all_reduce(losses)
    return losses


def agree_on_all_ranks(value: Any, s: Setup) -> list:
    """Every rank's `value` (a list of one element when not distributed)."""
    if s.world == 1:
        return [value]
    gathered: list = [None] * s.world
    torch.distributed.all_gather_object(gathered, value)
    return gathered


def merge_ranks(row: dict, n: int, s: Setup) -> None:
    """Record every rank's measurements in row["ranks"]; an ok row takes the slowest rank's step,
    the largest memory and the longest compile times."""
    per_rank = agree_on_all_ranks({k: row.get(k) for k in RANK_FIELDS}, s)
    row["ranks"] = per_rank
    if row["status"] != "ok":
        return
    row["step_ms_median"] = max(r["step_ms_median"] for r in per_rank)
    row["tokens_per_s"] = n / (row["step_ms_median"] / 1e3)
    row["peak_mem_gib"] = max((r["peak_mem_gib"] or 0.0) for r in per_rank) or None
    row["cold_compile_s"] = max(r["cold_compile_s"] for r in per_rank)
    warm = [r["warm_compile_s"] for r in per_rank if r["warm_compile_s"] is not None]
    row["warm_compile_s"] = max(warm) if warm else None


def close_ring() -> None:
    """Leave the process group."""
    torch.distributed.destroy_process_group()
