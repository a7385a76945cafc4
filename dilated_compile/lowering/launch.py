"""Launching a Triton kernel again without Triton's per-call binding (CUDA).

`fn[grid](*args, **constexprs)` binds and specialises every argument on every
call (nested tuples of tensors and a plan descriptor of hundreds of ints for
the combine kernels): 50-150 us of host time per launch on an H200, the
larger part of a dilated site's host time (benchmarks/NOTES.md, eighth
session). The first launch of a specialisation goes through Triton as usual
and returns its compiled kernel; later launches with the same
specialisation call that compiled kernel directly.

The specialisation is what Triton specialises on: each tensor's dtype and
whether its address is 16-byte aligned, each int's divisibility by 16, its
being 1, and its range (int32 or int64), and the constexpr values. Where
Triton returns no compiled kernel (its interpreter on the CPU) every launch
goes through Triton.
"""

from __future__ import annotations

from typing import Any

import torch

# Compiled kernels by (kernel, specialisation). Bounded: a process sees a
# handful of plans and layouts; past the bound the table starts over.
_COMPILED: dict[tuple, Any] = {}
_COMPILED_MAX = 512
INT32 = 2**31


def _spec(a: Any) -> Any:
    """What Triton specialises a non-constexpr argument on."""
    if isinstance(a, torch.Tensor):
        return (a.dtype, a.data_ptr() % 16 == 0)
    if isinstance(a, bool):
        return ("b", a)
    if isinstance(a, int):
        return (a == 1, a % 16 == 0, -INT32 <= a < INT32)
    if isinstance(a, tuple):
        return tuple(_spec(x) for x in a)
    return a


def launch(fn: Any, grid: tuple[int, ...], args: tuple, constexprs: dict, device: torch.device) -> None:
    """`fn[grid](*args, **constexprs)` on `device` (the current CUDA device), through
    the compiled kernel when one is known.

    `fn` is a `triton.jit` function, `args` its leading parameters in order,
    `constexprs` the rest by name.
    """
    key = (id(fn), tuple(constexprs.items()), _spec(args), device)
    known = _COMPILED.get(key)
    if known is not None:
        compiled, names = known
        compiled[grid](*args, *(constexprs[name] for name in names))
        return
    compiled = fn[grid](*args, **constexprs)
    from triton.compiler import CompiledKernel

    if isinstance(compiled, CompiledKernel):  # not under Triton's interpreter
        if len(_COMPILED) >= _COMPILED_MAX:
            _COMPILED.clear()
        _COMPILED[key] = (compiled, tuple(fn.arg_names[len(args) :]))
