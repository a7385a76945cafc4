"""Block sizes and launch options of the work-list kernels, and where the forward
reads its rows through tensor descriptors (Hopper's tensor memory accelerator).

Block sizes depend on the head dim and the kernel (per pattern or the ``longnet``
union, forward or backward); ``DILATED_WORKLIST_FWD`` / ``DILATED_WORKLIST_BWD``
(``bm,bn,warps,stages[,maxnreg]``) override them on CUDA. The forward's
descriptor launch keeps the rows and keys per step of its pointer launch, so
both share one work list.
"""

from __future__ import annotations

import os
from functools import lru_cache
from typing import NamedTuple

import torch


class Blocks(NamedTuple):
    """Rows per work item (block_m), keys per inner step (block_n), and launch options
    (`maxnreg`: registers per thread at most, None: as the compiler sees fit)."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    maxnreg: int | None = None

    @property
    def options(self) -> dict:
        """The launch's keyword options."""
        opts = {"num_warps": self.num_warps, "num_stages": self.num_stages}
        if self.maxnreg is not None:
            opts["maxnreg"] = self.maxnreg
        return opts


# Forward block sizes by head dim on CUDA; the interpreter uses small blocks so
# that tiny test shapes still span several blocks.
FORWARD_BLOCKS = {16: Blocks(128, 64, 4, 3), 32: Blocks(128, 64, 4, 3), 64: Blocks(128, 64, 4, 3),
                  128: Blocks(128, 64, 8, 3)}
# Backward: rows per item (block_m) and query/key rows per inner step (block_n).
# Head dim 128 on an H100 (fwd+bwd, bf16, 16 heads): (128, 32, 8, 3) took 0.516 ms at 16k
# (groups, causal) and 12.7 ms at 32k (LongNet, causal) where (64, 64, 4, 2) took
# 0.589 and 14.8 (and 16.7 against 16.0 at 32k non-causal).
BACKWARD_BLOCKS = {16: Blocks(64, 64, 4, 2), 32: Blocks(64, 64, 4, 2), 64: Blocks(64, 64, 4, 2),
                   128: Blocks(128, 32, 8, 3)}
INTERPRETER_BLOCKS = Blocks(32, 16, 1, 1)
# The forward where it reads rows through tensor descriptors (`forward_descriptor_blocks`): the same
# rows and keys per step, other launch options, by head dim. Head dim 128 on an H100
# (bf16, 16 heads, non-causal, useful TFLOP/s): two programs per multiprocessor (2 stages,
# at most 128 registers) gave 312 on 512-row segments at 8k, 435 on 2048-row ones and 486
# dense, where the pointer loads (FORWARD_BLOCKS) gave 286 / 389 / 432 and descriptors
# with the pointer loads' options 242 / 379 / 444.
DESCRIPTOR_FORWARD_OPTIONS = {128: (8, 2, 128)}  # num_warps, num_stages, maxnreg
# The ``longnet`` split as one softmax (`worklist_union.py`): 64-row items, whose rows
# (one class of positions in a window) are often no more than 64. Head dim 128 on an H100
# (8k, segments 512..4096, bf16, 16 heads): (64, 32, 4, 3) took 0.255 ms forward and
# 0.976 ms forward+backward; (64, 64, 4, 3) 0.262 forward, (64, 32, 4, 2) 1.24 fwd+bwd.
UNION_FORWARD_BLOCKS = {16: Blocks(64, 64, 4, 3), 32: Blocks(64, 64, 4, 3), 64: Blocks(64, 64, 4, 3),
                        128: Blocks(64, 32, 4, 3)}
UNION_BACKWARD_BLOCKS = {16: Blocks(64, 64, 4, 2), 32: Blocks(64, 64, 4, 2), 64: Blocks(64, 64, 4, 2),
                         128: Blocks(64, 32, 4, 3)}


FORWARD_SETTING = "DILATED_WORKLIST_FWD"
BACKWARD_SETTING = "DILATED_WORKLIST_BWD"


@lru_cache(maxsize=64)
def _blocks_of(device_type: str, head_dim: int, backward: bool, union: bool, forced: str | None) -> Blocks:
    if device_type != "cuda":
        return INTERPRETER_BLOCKS
    if forced:
        blocks = Blocks(*(int(x) for x in forced.split(",")))
        if blocks.block_m % blocks.block_n:
            variable = BACKWARD_SETTING if backward else FORWARD_SETTING
            raise ValueError(f"{variable}={forced!r}: block_m must be a multiple of block_n")
        return blocks
    if union:
        return (UNION_BACKWARD_BLOCKS if backward else UNION_FORWARD_BLOCKS)[head_dim]
    return (BACKWARD_BLOCKS if backward else FORWARD_BLOCKS)[head_dim]


def forward_blocks(q: torch.Tensor, union: bool = False) -> Blocks:
    """Block sizes of the forward for tensors like `q` (``DILATED_WORKLIST_FWD=bm,bn,warps,stages``
    or ``bm,bn,warps,stages,maxnreg`` overrides them on CUDA); `union`: of the ``longnet``
    split as one softmax."""
    return _blocks_of(q.device.type, q.shape[-1], False, union, os.environ.get(FORWARD_SETTING))


def backward_blocks(q: torch.Tensor, union: bool = False) -> Blocks:
    """Block sizes of the backward (``DILATED_WORKLIST_BWD=bm,bn,warps,stages`` on CUDA)."""
    return _blocks_of(q.device.type, q.shape[-1], True, union, os.environ.get(BACKWARD_SETTING))


TMA_SETTING = "DILATED_WORKLIST_TMA"


def forward_descriptor_blocks(q: torch.Tensor, blocks: Blocks) -> Blocks | None:
    """The block settings of the forward for tensors like `q` where it reads rows through
    tensor descriptors (`blocks`: those of its pointer loads, `forward_blocks`), or None
    where it does not. ``DILATED_WORKLIST_TMA``: auto (the default) on CUDA devices of
    compute capability 9.0 and later for the head dims of `DESCRIPTOR_FORWARD_OPTIONS`;
    on: every head dim, also under Triton's interpreter; off: never. Blocks set by
    ``DILATED_WORKLIST_FWD`` are kept."""
    return _descriptor_blocks(q.device.type, _capability(q.device), blocks, q.shape[-1],
                              bool(os.environ.get(FORWARD_SETTING)), os.environ.get(TMA_SETTING))


def _capability(device: torch.device) -> tuple[int, int] | None:
    """`device`'s compute capability; None off CUDA and for fake CUDA tensors traced without a GPU."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_capability(device)


@lru_cache(maxsize=16)
def _descriptor_blocks(device_type: str, capability: tuple[int, int] | None, blocks: Blocks, head_dim: int,
                       forced: bool, setting: str | None) -> Blocks | None:
    if setting not in (None, "auto", "on", "off"):
        raise ValueError(f"{TMA_SETTING}={setting!r}: expected auto, on or off")
    on = setting == "on"
    if setting == "off" or not (on or head_dim in DESCRIPTOR_FORWARD_OPTIONS):
        return None
    if device_type != "cuda":
        return blocks if on else None
    if capability is None:
        return None
    if capability < (9, 0):
        if on:
            raise ValueError(f"{TMA_SETTING}=on needs a GPU of compute capability 9.0 or later, not "
                             f"{capability[0]}.{capability[1]}: unset it")
        return None
    try:
        from triton.runtime import _allocation  # noqa: F401 - where Triton keeps its allocator
    except ImportError:
        return None
    if forced or head_dim not in DESCRIPTOR_FORWARD_OPTIONS:
        return blocks
    return Blocks(blocks.block_m, blocks.block_n, *DESCRIPTOR_FORWARD_OPTIONS[head_dim])


def descriptor_strides(element_size: int, head_dim: int, *strides: int) -> bool:
    """Whether rows with these strides (and head_dim contiguous values) are 16-byte
    aligned wherever an item starts, as tensor descriptors need."""
    return head_dim * element_size >= 16 and head_dim <= 256 and all(x * element_size % 16 == 0 for x in strides)


def _scratch(size: int, alignment: int, stream) -> torch.Tensor:
    """Global memory for the kernels' tensor descriptors, from the caching allocator."""
    return torch.empty(size, dtype=torch.int8, device="cuda")


def allocator_ready() -> None:
    """Give Triton an allocator for descriptor memory unless one is set in this thread."""
    from triton.runtime import _allocation

    if isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
        import triton

        triton.set_allocator(_scratch)
