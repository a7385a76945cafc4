"""Which kernel runs a dilated attention on CUDA, chosen once per plan: the
one-launch Triton work list (`worklist.py`) or gathered blocks (`compute.py`:
cuDNN or flash attention on views or copies of q/k/v, then the Triton combine).

The forward and the backward are chosen separately (both take and give the
merged out and log-sum-exp, so either backward follows either forward), by a
cost rule: each path's time is the larger of its host time per call and its
GPU time, the GPU time being the useful FLOPs of each part over a rate that
grows with the part's rows per segment ``m`` (``R * m / (m + m0)``, lower for
causal parts), plus, for the work list's merged ``longnet`` backward, its fp32
atomic sums (not where it runs as one softmax, `worklist_items.runs_as_union`).
The constants were measured on an H100 with torch 2.11, bf16, head dim 128 (docs/performance.md gives the
table): the work list's Triton kernel runs at about 0.8x cuDNN's rate on long
segments, and spends a fraction of the gathered-block path's host time, so it
wins wherever a call is short and loses on long ``longnet`` sites.

``DILATED_WORKLIST=on`` / ``off`` overrides the rule (``auto``, the default,
applies it); ``DILATED_KERNEL=<name>`` (a forced block kernel) and
``DILATED_COMBINE=inductor`` mean the gathered blocks. The site report says
which kernel a site runs and why (`describe_site`).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import torch

from ..common.combine import TRITON_INSTALLED
from .plan import Plan
from .worklist_items import UNION_SETTING, runs_as_union

WORKLIST = "work list"
BLOCKS = "gathered blocks"
HEAD_DIMS = (16, 32, 64, 128)  # the head dims `worklist_blocks.FORWARD_BLOCKS` and `BACKWARD_BLOCKS` hold


@dataclass(frozen=True)
class Rates:
    """One path's cost constants for one direction."""

    tflops: float  # useful TFLOP/s on long segments
    m0: float  # rows per segment at which the rate is half that
    host_ms: float  # host time per call (the GPU kept busy) ...
    host_ms_per_call: float = 0.0  # ... and per kernel call of the plan (the gathered blocks)
    causal_efficiency: float = 0.75  # the rate of causal parts over that of full ones (upper triangles)


# Measured on an H100 (torch 2.11, bf16, B=1, H=16, D=128, 8k-32k tokens; docs/performance.md):
# the host time of the gathered blocks grows with the plan's kernel calls (2 calls: 0.47 ms
# forward, 9 calls: 0.87 ms). The work list's constants fit its GPU times (in CUDA graphs) at
# 8k-32k, both splits, causal and not, within 10%; its forward's ``longnet`` merge adds no
# time of its own in that fit (the merge's bytes overlap the attention of other items).
COSTS = {
    (WORKLIST, "forward"): Rates(tflops=560, m0=680, host_ms=0.10, causal_efficiency=0.6),
    (WORKLIST, "backward"): Rates(tflops=380, m0=680, host_ms=0.90, causal_efficiency=0.65),
    (BLOCKS, "forward"): Rates(tflops=540, m0=256, host_ms=0.36, host_ms_per_call=0.057),
    (BLOCKS, "backward"): Rates(tflops=460, m0=256, host_ms=1.2, host_ms_per_call=0.25),
}
# The gathered-block forward is picked only where it is estimated at least 10% faster: its
# host time, which the rule counts per call, adds to the backward's in a training step (at 32k
# tokens, `groups`, the work-list forward with the gathered-block backward took 2.23 ms a step
# where gathered blocks both ways took 2.98 ms, though the blocks' forward alone was 7% faster).
BLOCKS_FORWARD_MARGIN = 0.9
BACKWARD_FLOPS = 2.5  # backward FLOPs per forward FLOP
ATOMIC_TB_S = 1.0  # fp32 atomic adds (the work list's longnet backward)


@dataclass(frozen=True)
class KernelChoice:
    """The kernel of the forward and of the backward, and why."""

    forward: str
    backward: str
    reason: str

    def describe(self) -> str:
        if self.forward == self.backward:
            return f"kernel: {self.forward} ({self.reason})"
        return f"kernel: {self.forward} forward, {self.backward} backward ({self.reason})"


def setting() -> str:
    """``DILATED_WORKLIST``: ``auto`` (the default: the cost rule), ``on`` or ``off``."""
    value = os.environ.get("DILATED_WORKLIST", "auto")
    if value not in ("auto", "on", "off"):
        raise ValueError(f"DILATED_WORKLIST={value!r}: expected auto, on or off")
    return value


def worklist_usable(dtype: torch.dtype, head_dim: int, device_type: str) -> str | None:
    """Why the work list cannot run tensors of this kind, or None when it can."""
    if device_type != "cuda":
        return "not CUDA"
    if not TRITON_INSTALLED:
        return "triton is not installed"
    if dtype not in (torch.float16, torch.bfloat16):
        return f"{str(dtype).replace('torch.', '')} (the work list runs fp16/bf16)"
    if head_dim not in HEAD_DIMS:
        return f"head dim {head_dim} (the work list runs {', '.join(map(str, HEAD_DIMS))})"
    if os.environ.get("DILATED_KERNEL"):
        return f"DILATED_KERNEL={os.environ['DILATED_KERNEL']} forces a block kernel"
    if os.environ.get("DILATED_COMBINE") == "inductor":
        return "DILATED_COMBINE=inductor"
    return None


def estimated_ms(plan: Plan, batch: int, head_dim: int, is_causal: bool, path: str, direction: str) -> float:
    """The cost rule's milliseconds of one call of `path` in `direction` (see the module doc)."""
    rates = COSTS[(path, direction)]
    gpu = 0.0
    for job in plan.jobs:
        for p in job.parts:
            m = p.m
            if not m:
                continue
            pairs = m * (m + 1) // 2 if is_causal else m * m
            flops = 4 * head_dim * pairs * p.n_segs * p.n_heads * batch
            if direction == "backward":
                flops *= BACKWARD_FLOPS
            rate = rates.tflops * m / (m + rates.m0) * (rates.causal_efficiency if is_causal else 1.0)
            gpu += flops / (rate * 1e9)
    rows = batch * plan.num_heads * plan.seq_len * head_dim  # elements of one (B, N, H, D) tensor
    patterns = plan.n_patterns if plan.head_split == "longnet" else 1
    if path == WORKLIST and patterns > 1 and direction == "backward" and not runs_as_union(plan, is_causal, True):
        gpu += 3 * patterns * rows * 4 / (ATOMIC_TB_S * 1e9)  # dq, dk, dv of every pattern into fp32 sums
    return max(rates.host_ms + rates.host_ms_per_call * len(plan.calls), gpu)


def _choose(plan: Plan, batch: int, head_dim: int, dtype: torch.dtype, device_type: str, is_causal: bool,
            setting_value: str, forced_kernel: str | None) -> KernelChoice:
    if setting_value == "off":
        return KernelChoice(BLOCKS, BLOCKS, "DILATED_WORKLIST=off")
    why_not = worklist_usable(dtype, head_dim, device_type)
    if why_not is not None:
        if setting_value == "on":
            warnings.warn(
                f"DILATED_WORKLIST=on: the dilated work list cannot run this attention ({why_not}); "
                "it runs as gathered blocks. Unset DILATED_WORKLIST to let the cost rule choose.",
                stacklevel=2,
            )
        return KernelChoice(BLOCKS, BLOCKS, why_not)
    if setting_value == "on":
        return KernelChoice(WORKLIST, WORKLIST, "DILATED_WORKLIST=on")
    picks, notes = [], []
    for direction in ("forward", "backward"):
        wl = estimated_ms(plan, batch, head_dim, is_causal, WORKLIST, direction)
        bl = estimated_ms(plan, batch, head_dim, is_causal, BLOCKS, direction)
        margin = BLOCKS_FORWARD_MARGIN if direction == "forward" else 1.0
        picks.append(BLOCKS if bl < margin * wl else WORKLIST)
        notes.append(f"{direction} est. {wl:.2f} ms vs {bl:.2f} ms")
    return KernelChoice(picks[0], picks[1], "cost rule: work list vs gathered blocks, " + "; ".join(notes))


# Choices by (id of the plan, ...): plans are cached by `plan.make_plan`, so one plan
# object serves every call of a shape; each entry keeps its plan, so a reused id cannot match.
_CHOICES: dict[tuple, tuple[Plan, KernelChoice]] = {}
_CHOICES_MAX = 512


def choose(plan: Plan, q: torch.Tensor, is_causal: bool) -> KernelChoice:
    """The `KernelChoice` of the dilated attention `plan` of (B, H, N, D) tensors like `q`
    (cached per plan, batch, head dim, dtype, device type and settings)."""
    args = (q.shape[0], q.shape[-1], q.dtype, q.device.type, bool(is_causal), setting(),
            os.environ.get("DILATED_KERNEL"))
    key = (id(plan), *args, os.environ.get(UNION_SETTING))  # the union backward has no atomic cost
    hit = _CHOICES.get(key)
    if hit is not None and hit[0] is plan:
        return hit[1]
    choice = _choose(plan, *args)
    if len(_CHOICES) >= _CHOICES_MAX:
        _CHOICES.clear()
    _CHOICES[key] = (plan, choice)
    return choice


def describe_site(segment_lengths, dilation_rates, head_split: str, shape, dtype, device, is_causal: bool
                  ) -> str | None:
    """The report's words on the kernel a dilated site runs, from its query shape
    (B, H, N, D), dtype and device as the graph gives them (None where unknown)."""
    if shape is None or dtype is None or device is None or len(shape) != 4:
        return None
    device_type = torch.device(device).type
    b, h, n, d = shape
    if not isinstance(d, int):
        return None
    setting_value, forced = setting(), os.environ.get("DILATED_KERNEL")
    if setting_value == "off":
        return KernelChoice(BLOCKS, BLOCKS, "DILATED_WORKLIST=off").describe()
    why_not = worklist_usable(dtype, d, device_type)
    if why_not is not None:
        return KernelChoice(BLOCKS, BLOCKS, why_not).describe()
    if setting_value == "on":
        return KernelChoice(WORKLIST, WORKLIST, "DILATED_WORKLIST=on").describe()
    if not all(isinstance(x, int) for x in (b, h, n)):
        return f"kernel: {WORKLIST} or {BLOCKS}, chosen per shape at run time by the cost rule"
    from ..common.block_kernels import multiprocessors
    from .plan import SMALL_PART_TILES, make_plan

    # the plan `plan_for` makes for cuDNN (the block kernel of CUDA fp16/bf16 where it runs)
    wave = multiprocessors(torch.device(device)) if torch.cuda.is_available() else 132
    plan = make_plan(h, n, tuple(segment_lengths), tuple(dilation_rates), head_split, SMALL_PART_TILES, wave)
    return _choose(plan, b, d, dtype, device_type, bool(is_causal), setting_value, forced).describe()
