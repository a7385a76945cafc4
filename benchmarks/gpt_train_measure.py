"""One configuration of the end-to-end training benchmark: build, compile, train and time it.

`run_config` trains a fresh model at one length with one backend and
returns its row: step times, tokens/s, cold and warm compile times, each
compile of the package's own Triton kernels in the cold step (whether it
found Triton's disk cache filled), peak memory, the losses, the attention
sites the backend reported and, with ``check_loss``, the first loss of an
eager run of the same attention; with ``profile_first_step``, the functions the
cold first step spent its host time in.
"""

from __future__ import annotations

import cProfile
import gc
import math
import os
import pstats
import statistics
import sys
import time
from contextlib import contextmanager
from typing import Any, Iterator

import torch

import dilated_compile
from gpt_model import GPT, clip_patterns
from gpt_train_config import BOUND_BACKENDS, RING_BACKENDS, Setup, expected_attention, policy_for
from gpt_train_ring import shard_batch, sum_gradients, sum_losses

OUT_OF_MEMORY = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


# ----------------------------------------------------------------------------- devices and caches


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def use_caches(directory: str) -> None:
    """Point Inductor's and Triton's on-disk caches at `directory` and drop in-memory compile caches."""
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = directory
    os.environ["TRITON_CACHE_DIR"] = os.path.join(directory, "triton")
    drop_in_memory_caches()


def drop_in_memory_caches() -> None:
    """Forget compiled frames (Dynamo), Inductor's in-memory caches and the package's compiled
    Triton kernels; disk caches stay."""
    torch._dynamo.reset()
    import torch._inductor.utils as inductor_utils

    clear = getattr(inductor_utils, "clear_caches", None) or getattr(inductor_utils, "clear_inductor_caches", None)
    if clear is not None:
        clear()
    drop_package_kernels()


def drop_package_kernels() -> None:
    """Forget the binaries of dilated_compile's own Triton kernels in this process. Triton keeps
    each kernel's compiled binaries in memory (on the kernel object, beside its disk cache), so
    without this a configuration would reuse the kernels an earlier one compiled and its cold
    compile would leave them out."""
    try:
        from triton.runtime.jit import JITFunction
    except ImportError:
        return
    for name, module in list(sys.modules.items()):
        if name.startswith("dilated_compile.") and module is not None:
            for obj in vars(module).values():
                if isinstance(obj, JITFunction):
                    obj.device_caches.clear()


@contextmanager
def package_compiles() -> Iterator[list[dict]]:
    """The compiles of dilated_compile's Triton kernels in this process while inside, each
    {"kernel", "cache_hit"}: a hit found the kernel in Triton's disk cache (compiled ahead
    in Inductor's workers), a miss compiled it here."""
    seen: list[dict] = []
    try:
        from triton import knobs
    except ImportError:
        yield seen
        return

    def listener(*, src, metadata, metadata_group, times, cache_hit) -> None:
        if getattr(getattr(src, "fn", None), "module", "").startswith("dilated_compile."):
            seen.append({"kernel": metadata["name"], "cache_hit": bool(cache_hit)})

    saved = knobs.compilation.listener
    knobs.compilation.listener = listener
    try:
        yield seen
    finally:
        knobs.compilation.listener = saved


@contextmanager
def host_profile(enabled: bool, top: int = 40) -> Iterator[dict]:
    """Where the host time inside went, when enabled: the `top` functions by cumulative
    and by own time (cProfile), each {"function", "calls", "own_s", "cumulative_s"}."""
    found: dict[str, list[dict]] = {}
    if not enabled:
        yield found
        return
    profile = cProfile.Profile()
    profile.enable()
    try:
        yield found
    finally:
        profile.disable()
        entries = [
            {"function": _short(pstats.func_std_string(func)), "calls": calls, "own_s": round(own, 4),
             "cumulative_s": round(cumulative, 4)}
            for func, (_, calls, own, cumulative, _) in pstats.Stats(profile).stats.items()
        ]
        found["by_cumulative"] = sorted(entries, key=lambda e: -e["cumulative_s"])[:top]
        found["by_own"] = sorted(entries, key=lambda e: -e["own_s"])[:top]


_CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + "/"


def _short(where: str) -> str:
    """A profiled function's file relative to its package root (site-packages or the checkout)."""
    for marker in ("site-packages/", _CHECKOUT):
        if marker in where:
            return where.split(marker, 1)[1]
    return where


def free_device(device: torch.device) -> None:
    """Release what a finished or failed configuration left behind."""
    drop_in_memory_caches()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def is_oom(error: BaseException) -> bool:
    """True for a device out-of-memory error, also when wrapped by the compiler."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OUT_OF_MEMORY) or "out of memory" in str(error).lower():
            return True
        error = error.__cause__ or error.__context__
    return False


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


# ----------------------------------------------------------------------------- the model


def make_batch(n: int, vocab: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids (1, n) and next-token labels (1, n), the same on every rank."""
    g = torch.Generator().manual_seed(n)
    tokens = torch.randint(0, vocab, (1, n + 1), generator=g)
    return tokens[:, :-1].to(device), tokens[:, 1:].to(device)


def build_model(s: Setup, device: torch.device) -> GPT:
    """The model, initialised on `device` from seed 0 (the same weights for every configuration)."""
    torch.manual_seed(0)
    with device:
        model = GPT(s.layers, s.width, s.heads, s.vocab)
    return model.to(s.dtype)


def attach(model: GPT, backend: str, n: int, s: Setup) -> dict | None:
    """Set the model up for `backend` at global length n; the policy used, if any."""
    policy = policy_for(backend, n, s)
    if backend == "seed":
        for block in model.blocks:
            block.attn.seed = clip_patterns(s.segments, s.rates, n)
        return None
    if backend == "no_attention":
        for block in model.blocks:
            block.attn.values_only = True
    compile_backend = s.dense_compiler if backend in ("inductor",) + BOUND_BACKENDS else "dilated"
    options = None if policy is None else {"policy": policy}
    for block in model.blocks:
        block.compile(backend=compile_backend, options=options, dynamic=False)
    return policy


def reference_first_loss(backend: str, n: int, s: Setup) -> float:
    """The loss before any step, of the same model run eagerly on the whole sequence in one process,
    with the attention `backend` should compute (dense SDPA, or eager `dilated_attention`)."""
    model = build_model(s, s.device)
    dilated = expected_attention(backend, n, s)
    for block in model.blocks:
        block.attn.dilated = dilated
        block.attn.values_only = backend == "no_attention"
    idx, labels = make_batch(n, s.vocab, s.device)
    with torch.no_grad():
        return (model(idx, torch.arange(n, device=s.device), labels) / labels.numel()).item()


def warm_up_process(s: Setup, cache_dir: str) -> float:
    """Pay the process's one-time costs (device context, kernel libraries, Inductor's compile workers,
    Triton) on a tiny compiled training step, so that no configuration's cold compile includes them."""
    t0 = time.perf_counter()
    use_caches(cache_dir)
    torch.manual_seed(0)
    with s.device:
        tiny = GPT(1, 64, 2, 256).to(s.dtype)
    tiny.blocks[0].compile(backend=s.dense_compiler, dynamic=False)
    idx, labels = make_batch(128, 256, s.device)
    tiny(idx, torch.arange(128, device=s.device), labels).backward()
    synchronize(s.device)
    wait_for_compile_workers()
    drop_in_memory_caches()
    return time.perf_counter() - t0


def wait_for_compile_workers() -> None:
    """Wait until Inductor's compile workers have started (a process's first compile runs
    while they start, compiling in the process itself)."""
    try:
        from torch._inductor.async_compile import AsyncCompile

        AsyncCompile.wait_pool_ready()
    except (ImportError, AttributeError, RuntimeError):
        pass


# ----------------------------------------------------------------------------- one configuration


def run_config(backend: str, n: int, s: Setup, cache_dir: str) -> dict:
    """Train `steps` timed steps of a fresh model at length n with `backend`; the measurements."""
    dev = s.device
    ring = backend in RING_BACKENDS
    idx, labels = make_batch(n, s.vocab, dev)
    pos = torch.arange(n, device=dev)
    n_tokens = labels.numel()
    if ring:
        idx, labels, pos = shard_batch(idx, labels, pos)

    model = build_model(s, dev)
    model.checkpoint_blocks = s.checkpoint_blocks
    if s.fresh_caches:
        use_caches(cache_dir)
    else:  # caches shared by the run: only the compiled frames and in-memory caches go
        drop_in_memory_caches()
    dilated_compile.clear_reports()
    policy = attach(model, backend, n, s)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=dev.type == "cuda")
    params = list(model.parameters())
    losses: list[torch.Tensor] = []

    def step() -> None:
        loss = model(idx, pos, labels) / n_tokens
        loss.backward()
        if ring:
            sum_gradients(params)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())

    row: dict[str, Any] = {"backend": backend, "length": n, "policy": policy}
    t0 = time.perf_counter()
    with package_compiles() as compiles, host_profile(s.profile_first_step) as profile:
        step()  # compiles (cold caches)
        synchronize(dev)
    row["first_step_s"] = time.perf_counter() - t0
    if profile:
        row["first_step_profile"] = profile
    row["package_compiles"] = compiles
    row["package_cache_hits"] = f"{sum(c['cache_hit'] for c in compiles)}/{len(compiles)}"
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
    row["losses"] = (sum_losses(stacked) if ring else stacked).tolist()
    if s.check_loss and backend != "seed":
        row["reference_first_loss"] = reference_first_loss(backend, n, s)
    if not all(math.isfinite(x) for x in row["losses"]):
        raise FloatingPointError(f"{backend} at {n}: non-finite loss {row['losses']}")
    row["status"] = "ok"
    return row
