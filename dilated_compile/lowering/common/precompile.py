"""The custom ops' Triton kernels compiled while Inductor compiles the graph around them.

Triton compiles a kernel on its first launch, so without this a compiled
model's first step would compile the package's kernels one after another
after Inductor has finished. Instead, when tracing first meets an op with
concrete shapes on CUDA (its fake implementation runs), the op lists the
launches its first call will make (`KernelLaunch`: the kernel, its argument
types and integer values, its options) and `submit` hands each to Inductor's
compile workers. A worker compiles it for the device's target, with this
process's ``TRITON_*`` environment (cache directory, ptxas), into Triton's
disk cache, under the key the launch will look up, and builds the kernel's
launcher stub (a C module Triton compiles with gcc); the first launch then
finds both there (`wait` first lets a launch wait for a compile still running).

A launch's key is what Triton's JIT specialises on: tensors' dtypes and
16-byte alignment (a listed tensor is taken as aligned), each integer's value
class, constexprs and options. Where a real argument differs (a misaligned
view), the launch compiles at its first call; nothing else depends on it.
``DILATED_PRECOMPILE=0`` turns it off; it is off where Inductor compiles in
the calling process (``compile_threads`` 1) and while Inductor's worker pool
is starting (a process's first compile: a job would wait for the workers to
start, longer than the compile takes here).
"""

from __future__ import annotations

import importlib
import logging
import os
import time
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Iterable

import torch

log = logging.getLogger(__name__)

SETTING = "DILATED_PRECOMPILE"
WAIT_LIMIT_S = 300.0  # past this a launch stops waiting for a worker and compiles its kernel itself


@dataclass(frozen=True)
class TensorArg:
    """A tensor argument of a launch: its dtype (its pointer taken as 16-byte aligned)."""

    dtype: torch.dtype


@dataclass(frozen=True)
class KernelLaunch:
    """What Triton's JIT specialises a launch of one kernel on.

    `args`: the positional arguments, a `TensorArg` for each tensor (tuples of
    them for tuple arguments), ints, floats and bools as passed; `options`:
    the keyword arguments (constexprs, ``num_warps``, ``num_stages``) as
    (name, value) pairs in the order the launch passes them."""

    module: str
    name: str
    args: tuple
    options: tuple[tuple[str, Any], ...]

    @classmethod
    def of(cls, fn, args: Iterable, **options: Any) -> "KernelLaunch":
        """The launch of the ``@triton.jit`` function `fn` with `args` (tensors or `TensorArg`)."""
        inner = fn.fn
        return cls(inner.__module__, inner.__name__, tuple(_described(a) for a in args),
                   tuple(options.items()))


def _described(arg):
    if isinstance(arg, torch.Tensor):
        return TensorArg(arg.dtype)
    if isinstance(arg, torch.dtype):
        return TensorArg(arg)
    if isinstance(arg, (tuple, list)):
        return tuple(_described(a) for a in arg)
    return arg


def enabled(device: torch.device) -> bool:
    """Whether `submit` may compile launches on `device` in Inductor's workers."""
    if device.type != "cuda" or os.environ.get(SETTING, "1") in ("0", "off", "false"):
        return False
    if os.environ.get("TRITON_INTERPRET") == "1":
        return False
    try:
        from torch._inductor.async_compile import get_compile_threads

        return get_compile_threads() > 1
    except ImportError:
        return False


def ready(device: torch.device) -> bool:
    """Whether `submit` compiles launches on `device` in Inductor's workers now: `enabled`,
    and the workers have started (while they start, a job would wait for them)."""
    if not enabled(device):
        return False
    try:
        from torch._inductor.async_compile import AsyncCompile

        return bool(AsyncCompile.use_process_pool())
    except Exception as e:  # an optimisation only: the kernels then compile at their first launch
        log.info("dilated_compile: kernels compile at their first launch (%s: %s)", type(e).__name__, e)
        return False


# Launches handed to the workers, by (target, Triton's environment, launch) (bounded: when full it
# is emptied, and a launch submitted again compiles again, a disk-cache hit), and the
# compiles no launch has waited for yet.
_SUBMITTED: dict[tuple, None] = {}
_SUBMITTED_MAX = 1024
_PENDING: dict[tuple, Any] = {}


def submit(device: torch.device, launches: Iterable[KernelLaunch]) -> bool:
    """Start compiling `launches` for `device` in Inductor's compile workers (once each);
    whether they are handed over (False: they compile at their first launch)."""
    if not ready(device):
        log.debug("dilated_compile: no compile workers ready; kernels compile at their first launch")
        return False
    try:
        from torch._inductor.async_compile import AsyncCompile

        target, env = _target(_index(device)), triton_env(_index(device))
        new = [launch for launch in launches if (target, env, launch) not in _SUBMITTED]
        if new:
            _forget_tool_versions()  # this process's next key names the ptxas its environment names now
        pool = AsyncCompile.process_pool()
        for launch in new:
            key = (target, env, launch)
            if len(_SUBMITTED) >= _SUBMITTED_MAX:
                _SUBMITTED.clear()
            _SUBMITTED[key] = None
            _PENDING[key] = pool.submit(compile_launch, target, env, launch)
            log.debug("dilated_compile: %s handed to the compile workers", launch.name)
        return True
    except Exception as e:  # an optimisation only: the kernels then compile at their first launch
        log.info("dilated_compile: kernels compile at their first launch (%s: %s)", type(e).__name__, e)
        return False


def pending() -> bool:
    """Whether a submitted compile has not been waited for (cheap: a launch path's test)."""
    return bool(_PENDING)


def wait(device: torch.device, launch: KernelLaunch) -> None:
    """Wait for `launch`'s compile on `device` if one was submitted and is still running."""
    if not _PENDING:
        return
    for key in [k for k, job in _PENDING.items() if job.done() and k[2] != launch]:
        del _PENDING[key]  # finished: nothing to wait for
    try:
        job = _PENDING.pop((_target(_index(device)), triton_env(_index(device)), launch), None)
    except Exception:
        return
    if job is None:
        return
    start = time.perf_counter()
    try:
        seconds = job.result(timeout=WAIT_LIMIT_S)
        log.debug("dilated_compile: %s waited %.2f s for its compile (%.2f s in a worker)", launch.name,
                  time.perf_counter() - start, seconds)
    except Exception as e:
        log.info("dilated_compile: %s compiles at its first launch (%s: %s)", launch.name, type(e).__name__, e)


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


@lru_cache(maxsize=16)
def _target(index: int):
    """Triton's target of CUDA device `index` (what its JIT compiles for)."""
    from triton.runtime import driver

    with torch.cuda.device(index):
        return driver.active.get_current_target()


def triton_env(index: int) -> tuple[tuple[str, str], ...]:
    """This process's ``TRITON_*`` environment variables, which a compile in a worker
    takes for its own: they choose the cache directory and the tools (ptxas), and
    with them the keys.

    Set first, as Inductor sets them before it compiles a kernel in this process
    (so that they do not change between a submission and the launch): the cache
    directory for device `index`, and the ptxas that torch ships, where it ships one."""
    if os.environ.get("TRITON_CACHE_DIR") is None:
        from torch._inductor.runtime.cache_dir_utils import triton_cache_dir

        os.environ["TRITON_CACHE_DIR"] = triton_cache_dir(index)
    try:
        from torch._inductor.runtime.compile_tasks import _set_triton_ptxas_path
    except ImportError:
        pass
    else:
        _set_triton_ptxas_path()
    return tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith("TRITON_")))


class _TargetOnly:
    """Triton's driver as far as compiling without launching reads it: the target,
    a device and a stream (a worker has no CUDA context and needs none)."""

    def __init__(self, target):
        self.target = target

    def get_current_target(self):
        return self.target

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device=None) -> int:
        return 0


def _mock(arg):
    from triton.runtime.jit import MockTensor

    if isinstance(arg, TensorArg):
        return MockTensor(arg.dtype)
    if isinstance(arg, tuple):
        return tuple(_mock(a) for a in arg)
    return arg


def _forget_tool_versions() -> None:
    """Drop Triton's cached ptxas version (part of every compile's key): Inductor's
    workers compile their own kernels with torch's ptxas, this process with the one
    its environment names."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas_version

        get_ptxas_version.cache_clear()
    except (ImportError, AttributeError):
        pass


def _build_launcher(kernel) -> None:
    """Build the host stub that launches `kernel` (a C module Triton compiles with the
    system's C compiler and keeps in its cache, once per kernel signature), where this
    Triton builds one and the machine can link it (libcuda)."""
    try:
        from triton.backends.nvidia.driver import CudaLauncher

        CudaLauncher(kernel.src, kernel.metadata)
    except Exception as e:  # the first launch builds it
        log.debug("dilated_compile: no launcher built ahead (%s: %s)", type(e).__name__, e)


def compile_launch(target, env: tuple[tuple[str, str], ...], launch: KernelLaunch) -> float:
    """Compile `launch` for `target` with the ``TRITON_*`` environment `env` (its cache
    directory and tools, as `triton_env` gives them); the seconds taken. Runs in a
    compile worker (or any process: it touches no GPU)."""
    from triton.runtime import driver

    start = time.perf_counter()
    fn = getattr(importlib.import_module(launch.module), launch.name)
    saved = {k: v for k, v in os.environ.items() if k.startswith("TRITON_")}
    for name in saved:
        del os.environ[name]
    os.environ.update(env)
    _forget_tool_versions()
    previous = driver._active  # restored as it was: `reset_active` would make the real driver
    driver.set_active(_TargetOnly(target))
    try:
        kernel = fn.warmup(*(_mock(a) for a in launch.args), grid=(1,), **dict(launch.options))
        _build_launcher(kernel)
    finally:
        driver._active = previous
        fn.device_caches.clear()  # the next job may be for another target
        for name, _ in env:
            del os.environ[name]
        os.environ.update(saved)
        _forget_tool_versions()
    return time.perf_counter() - start
