"""Block-sparse patterns (docs/spec.md, "Block-sparse attention") as predicates on block and token indices.

One definition of each pattern, `blocks_active`, written with tensor ops on
(broadcast) block indices. Everything else is derived from it: the token-level
`mask_mod` FlexAttention evaluates, the CPU lowering's key-block lists, the
float64 reference and the pictures in the README.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import weakref
from collections.abc import Callable, Mapping
from functools import lru_cache

import torch

from ...policy.specs import BlockPattern
from ...policy.errors import PolicyError
from ...policy.patterns import parse_pattern

MaskMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

BUILTIN_KINDS = ("local_window", "dilated", "global_local")


def as_pattern(pattern: BlockPattern | Mapping | Callable, block_size: int) -> BlockPattern:
    """A validated `BlockPattern` from a policy object, a mapping written like the
    policy's ``pattern:`` entry, or a mask_mod callable."""
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be an integer >= 1, got {block_size!r}")
    if isinstance(pattern, BlockPattern):
        return pattern
    if callable(pattern):
        name = f"{getattr(pattern, '__module__', '?')}:{getattr(pattern, '__qualname__', '?')}#{id(pattern)}"
        _CALLABLES[name] = pattern
        return BlockPattern(kind="mask_mod", function=name)
    if isinstance(pattern, Mapping):
        fields = dict(pattern)
        window = fields.pop("token_window", None)
        try:
            parsed = parse_pattern(fields, key="pattern")
        except PolicyError as exc:
            raise ValueError(f"pattern {dict(pattern)!r}: {exc}") from None
        if window is None:
            return parsed
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"pattern {dict(pattern)!r}: token_window must be an integer >= 1")
        return dataclasses.replace(parsed, token_window=window)
    raise TypeError(
        f"pattern must be a BlockPattern, a mapping like {{'kind': 'local_window', 'window': 2}} "
        f"or a mask_mod callable, got {type(pattern).__name__}"
    )


@torch._dynamo.assume_constant_result
def _pattern_fields(pattern: BlockPattern | Mapping | Callable, block_size: int) -> tuple:
    """`as_pattern`'s fields (a constant to Dynamo, which then does not trace the policy loader)."""
    return as_pattern(pattern, block_size).as_tuple()


def constant_pattern(pattern: BlockPattern | Mapping | Callable, block_size: int) -> BlockPattern:
    """`as_pattern`, also under Dynamo (which takes the pattern as a constant)."""
    if isinstance(pattern, BlockPattern):
        return pattern
    return BlockPattern(*_pattern_fields(pattern, block_size))


# mask_mod callables given directly (not by import path), by the name in their
# BlockPattern; weak, so a dropped callable is not kept alive.
_CALLABLES: weakref.WeakValueDictionary[str, Callable] = weakref.WeakValueDictionary()


def load_mask_mod(function: str) -> MaskMod:
    """The callable a ``package.module:name`` string names."""
    if function in _CALLABLES:
        return _CALLABLES[function]
    module_name, _, attr_path = function.partition(":")
    target = importlib.import_module(module_name)
    for attr in attr_path.split("."):
        target = getattr(target, attr)
    return target


def blocks_active(pattern: BlockPattern, qb: torch.Tensor, kb: torch.Tensor) -> torch.Tensor:
    """Whether key block `kb` is active for query block `qb` (built-in kinds; broadcasts)."""
    d = qb - kb
    local = d.abs() <= pattern.window
    if pattern.kind == "local_window":
        return local
    if pattern.kind == "dilated":
        return local | (d.abs() % pattern.stride == 0)
    if pattern.kind == "global_local":
        g = pattern.global_blocks
        return local | (qb < g) | (kb < g)
    raise ValueError(f"blocks_active: pattern kind {pattern.kind!r} is not a block-level pattern")


def in_window(window: int | None, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor | bool:
    """Whether key positions are within a token window of query positions (|i - j| <
    window; broadcasts); True where there is no window."""
    if window is None:
        return True
    return (q_idx - kv_idx).abs() < window


def token_mask_mod(pattern: BlockPattern, block_size: int, is_causal: bool) -> MaskMod:
    """The pattern as a FlexAttention ``mask_mod(b, h, q_idx, kv_idx)`` on global
    token positions, causal and the token window applied per token."""
    if pattern.kind == "mask_mod":
        user = load_mask_mod(pattern.function)

        def in_pattern(b, h, q_idx, kv_idx):
            return user(b, h, q_idx, kv_idx)
    else:

        def in_pattern(b, h, q_idx, kv_idx):
            return blocks_active(pattern, q_idx // block_size, kv_idx // block_size)

    window = pattern.token_window
    if window is None:
        allowed = in_pattern
    else:

        def allowed(b, h, q_idx, kv_idx):
            return in_pattern(b, h, q_idx, kv_idx) & ((q_idx - kv_idx).abs() < window)

    if not is_causal:
        return allowed

    def causal_allowed(b, h, q_idx, kv_idx):
        return allowed(b, h, q_idx, kv_idx) & (kv_idx <= q_idx)

    return causal_allowed


def evaluate_mask_mod(
    mask_mod: MaskMod, batch: int, heads: int, q_idx: torch.Tensor, kv_idx: torch.Tensor
) -> torch.Tensor:
    """(batch, heads, len(q_idx), len(kv_idx)) bool: `mask_mod` on every pair,
    vectorised with vmap the way FlexAttention evaluates it."""
    fn = mask_mod
    for dims in ((None, None, None, 0), (None, None, 0, None), (None, 0, None, None), (0, None, None, None)):
        fn = torch.vmap(fn, in_dims=dims, out_dims=0)
    device = q_idx.device
    b = torch.arange(batch, device=device)
    h = torch.arange(heads, device=device)
    with _vmap_dispatch_enabled():
        return fn(b, h, q_idx, kv_idx).to(torch.bool)


_VMAP_KEYS = tuple(
    getattr(torch._C.DispatchKey, name)
    for name in ("FuncTorchDynamicLayerFrontMode", "FuncTorchDynamicLayerBackMode", "FuncTorchBatched",
                 "FuncTorchVmapMode")
)


@contextlib.contextmanager
def _vmap_dispatch_enabled():
    """vmap's dispatch keys un-excluded for the block, where the thread excludes them.

    A compiled graph's first call runs our custom ops under AOTAutograd's aliasing
    check (a TorchDispatchMode, torch 2.11-2.13, `config.check_custom_op_aliasing`),
    which runs the op's implementation with every key above Python excluded, vmap's
    among them: torch.vmap there fails ("NYI: querying is_contiguous inside of vmap").
    A block-sparse op with a mask_mod pattern evaluates the mask with vmap."""
    excluded = torch._C._dispatch_tls_local_exclude_set()
    if not excluded.has(torch._C.DispatchKey.FuncTorchBatched):
        yield
        return
    for key in _VMAP_KEYS:
        excluded = excluded.remove(key)
    with torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), excluded):
        yield


@lru_cache(maxsize=32)
def block_layout(pattern: BlockPattern, block_size: int, n: int) -> torch.Tensor:
    """(nb, nb) bool block layout of a built-in pattern for sequence length n (CPU)."""
    nb = -(-n // block_size)
    idx = torch.arange(nb)
    return blocks_active(pattern, idx[:, None], idx[None, :])


def density(pattern: BlockPattern, block_size: int, n: int) -> float:
    """Fraction of (query block, key block) pairs that are active (non-causal)."""
    layout = block_layout(pattern, block_size, n)
    return float(layout.float().mean()) if layout.numel() else 0.0
