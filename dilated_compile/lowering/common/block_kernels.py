"""Attention on dense blocks that returns its log-sum-exp, and the matching backward.

Every strategy in this package reduces to calls of `block_attention`: a batch
of independent dense (optionally causal) attentions over contiguous blocks.
The forward returns the output and the log-sum-exp of the scaled scores per
query row, so partial results can be merged; the backward takes an output
and log-sum-exp that may be the *merged* ones, which is what makes the
gradient of a log-sum-exp merge exact.

The kernel is one of PyTorch's fused attention ops, picked by device, dtype
and head size (the op keeps its own backward kernel):

- ``cpu``:       ``aten._scaled_dot_product_flash_attention_for_cpu``
- ``cudnn``:     ``aten._scaled_dot_product_cudnn_attention`` (CUDA fp16/bf16)
- ``flash``:     ``aten._scaled_dot_product_flash_attention`` (CUDA fp16/bf16)
- ``efficient``: ``aten._scaled_dot_product_efficient_attention`` (CUDA fp32)
- ``math``:      plain matmul/softmax, for anything else.

``DILATED_KERNEL=<name>`` forces one (benchmarks use it to compare).

The fused kernels run inside two custom ops,
``torch.ops.dilated_compile.block_attention`` and ``block_attention_backward``,
so that the layouts they need are made at run time (see the comment above
them); the ``math`` kernel is plain ops that Inductor fuses.
"""

from __future__ import annotations

import functools
import os
from typing import NamedTuple

import torch

from .storage import accumulation_dtype
from .view_replay import opaque_op

__all__ = [
    "BlockResult",
    "accumulation_dtype",
    "block_attention",
    "block_attention_backward",
    "choose_kernel",
    "multiprocessors",
]
aten = torch.ops.aten

KERNELS = ("cpu", "cudnn", "flash", "efficient", "math")


class BlockResult(NamedTuple):
    out: torch.Tensor  # (batch, heads, m, head_dim), input dtype
    lse: torch.Tensor  # (batch, heads, m), float32 (float64 for float64 inputs)


def _cudnn_usable(q: torch.Tensor) -> bool:
    return q.shape[-1] % 8 == 0 and q.shape[-1] <= 128 and _cudnn_sdp_on(q.device)


def _cudnn_sdp_on(device: torch.device) -> bool:
    """cuDNN attention is available, supported by `device` (Hopper or newer) and enabled.

    While Dynamo traces (a user's compiled function calling our attention
    directly) the SDPA backend flags cannot be read: Dynamo rejects
    `cudnn_sdp_enabled()` and `cudnn.is_available()` ("torch.* op returned
    non-Tensor"), and `torch.compiler.assume_constant_result` gives a wrong
    truth value (False counts as true). The traced code then uses cuDNN
    wherever the build and the device support it.
    """
    if device.type != "cuda" or not torch._C._has_cudnn:
        return False
    if torch.compiler.is_compiling():  # a traced device may have no GPU behind it
        return torch.cuda.is_available() and torch.cuda.get_device_properties(device).major >= 9
    return torch.backends.cuda.cudnn_sdp_enabled() and _capability(device) >= (9, 0)


@functools.lru_cache(maxsize=16)  # devices of one process
def _capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


@functools.lru_cache(maxsize=16)  # devices of one process
def multiprocessors(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (132 elsewhere: an H100/H200's)."""
    if device.type != "cuda":
        return 132
    return torch.cuda.get_device_properties(device).multi_processor_count


def _one_query_one_key(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Blocks of a single query and a single key: cuDNN rejects them
    ("s_q = s_kv = 1 is not supported"). They occur where the last, short
    segment of a sequence holds one selected position."""
    m, mk = q.shape[-2], k.shape[-2]
    return type(m) is int and type(mk) is int and m == mk == 1


def choose_kernel(q: torch.Tensor, k: torch.Tensor | None = None) -> str:
    """Name of the kernel `block_attention` uses for blocks like `q` (and `k`)."""
    forced = os.environ.get("DILATED_KERNEL")
    if forced:
        if forced not in KERNELS:
            raise ValueError(f"DILATED_KERNEL={forced!r}: expected one of {', '.join(KERNELS)}")
        return forced
    if q.device.type == "cpu":
        return "cpu"
    if q.device.type == "cuda":
        half = q.dtype in (torch.float16, torch.bfloat16)
        if half and _cudnn_usable(q) and not _one_query_one_key(q, q if k is None else k):
            return "cudnn"
        if half and q.shape[-1] % 8 == 0 and q.shape[-1] <= 256:
            return "flash"
        if q.dtype == torch.float32 and q.shape[-1] % 4 == 0:
            return "efficient"
    return "math"


def _laid_out_like_cudnn_out(t: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """`t` (shaped like q) with the strides of the `out` cuDNN attention allocates for `q`
    (``empty_like(q)``): `t` itself when it has them, else a copy."""
    like = torch.empty_like(q, dtype=t.dtype)
    if t.stride() == like.stride():
        return t
    return like.copy_(t)


def _seq_major(t: torch.Tensor) -> torch.Tensor:
    """(B, H, M, D) stored as (B, M, H, D): the layout flash and efficient kernels use."""
    return t.transpose(1, 2).contiguous().transpose(1, 2)


def _math_scores(q, k, is_causal, scale):
    """Scaled scores in the accumulation dtype, -inf above the diagonal when causal."""
    acc = accumulation_dtype(q)
    s = torch.matmul(q.to(acc), k.to(acc).transpose(-2, -1)) * scale
    if is_causal:
        m = q.shape[-2]
        keep = torch.ones(m, m, dtype=torch.bool, device=q.device).tril()
        s = s.masked_fill(~keep, float("-inf"))
    return s


def _math_forward(q, k, v, is_causal, scale):
    s = _math_scores(q, k, is_causal, scale)
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse.unsqueeze(-1))
    return torch.matmul(p, v.to(s.dtype)).to(q.dtype), lse


def _math_backward(dout, q, k, v, out, lse, is_causal, scale):
    acc = accumulation_dtype(q)
    qa, ka, va, da = q.to(acc), k.to(acc), v.to(acc), dout.to(acc)
    s = _math_scores(q, k, is_causal, scale)
    p = torch.exp(s - lse.to(acc).unsqueeze(-1))
    dv = torch.matmul(p.transpose(-2, -1), da)
    dp = torch.matmul(da, va.transpose(-2, -1))
    delta = (da * out.to(acc)).sum(-1, keepdim=True)
    ds = p * (dp - delta)
    dq = torch.matmul(ds, ka) * scale
    dk = torch.matmul(ds.transpose(-2, -1), qa) * scale
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def _forward_impl(kernel: str, q, k, v, is_causal: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) of the fused kernel `kernel` (runs on real and on fake tensors alike)."""
    m = q.shape[-2]
    if kernel == "cpu":
        out, lse = aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, is_causal, scale=scale
        )
        return out, lse
    if kernel == "flash":  # not the fast path on Hopper: dense inputs, fewest surprises
        q, k, v = _seq_major(q), _seq_major(k), _seq_major(v)
        res = aten._scaled_dot_product_flash_attention(q, k, v, 0.0, is_causal, False, scale=scale)
        return res[0], res[1]
    if kernel == "cudnn":
        res = aten._scaled_dot_product_cudnn_attention(
            q, k, v, None, True, 0.0, is_causal, False, scale=scale
        )
        return res[0], res[1].reshape(q.shape[:-1])
    if kernel == "efficient":  # the fp32 path
        q, k, v = _seq_major(q), _seq_major(k), _seq_major(v)
        res = aten._scaled_dot_product_efficient_attention(
            q, k, v, None, True, 0.0, is_causal, scale=scale
        )
        return res[0], res[1][..., :m].contiguous()
    raise ValueError(f"no fused kernel {kernel!r}")


def _unused_rng_state(q: torch.Tensor) -> torch.Tensor:
    """The dropout RNG seed/offset argument of a fused backward: read only with
    dropout, which is always 0 here, so left uninitialised (no fill kernel)."""
    return torch.empty((), dtype=torch.int64, device=q.device)


def _backward_impl(kernel: str, dout, q, k, v, out, lse, is_causal: bool, scale: float):
    """(dq, dk, dv) of the fused kernel `kernel` (runs on real and on fake tensors alike)."""
    m, mk = q.shape[-2], k.shape[-2]  # differ in a ring's off-diagonal blocks
    out = out.to(q.dtype)
    if kernel == "cpu":
        dq, dk, dv = aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout, q, k, v, out, lse.to(accumulation_dtype(q)), 0.0, is_causal, scale=scale
        )
        return dq, dk, dv
    if kernel == "flash":
        dout, q, k, v, out = (_seq_major(t) for t in (dout, q, k, v, out))
        seed = _unused_rng_state(q)
        dq, dk, dv = aten._scaled_dot_product_flash_attention_backward(
            dout, q, k, v, out, lse.float().contiguous(), None, None, m, mk, 0.0, is_causal,
            seed, seed, scale=scale,
        )
        return dq, dk, dv
    if kernel == "cudnn":
        # torch caches cuDNN's backward graph by q/k/v sizes and strides alone,
        # per process, with the out/grad_out strides of the call that built it
        # baked in. torch's own SDPA backward passes out/grad_out laid out like
        # `empty_like(q)` (its forward allocates out so); every call here does
        # the same, so that a graph built by either serves both. Otherwise a
        # later call with the same q/k/v layout reads out/grad_out with the
        # wrong strides: an illegal memory access, or wrong gradients.
        dout, out = _laid_out_like_cudnn_out(dout, q), _laid_out_like_cudnn_out(out, q)
        seed = _unused_rng_state(q)
        dq, dk, dv = aten._scaled_dot_product_cudnn_attention_backward(
            dout, q, k, v, out, lse.float().contiguous().unsqueeze(-1), seed, seed, None,
            None, None, m, mk, 0.0, is_causal, scale=scale,
        )
        return dq, dk, dv
    if kernel == "efficient":
        dout, q, k, v, out = (_seq_major(t) for t in (dout, q, k, v, out))
        pad = (-m) % 32
        lse_padded = torch.nn.functional.pad(lse.float(), (0, pad)).contiguous()
        seed = _unused_rng_state(q)
        dq, dk, dv, _ = aten._scaled_dot_product_efficient_attention_backward(
            dout, q, k, v, None, out, lse_padded, seed, seed, 0.0,
            [True, True, True, False], is_causal, scale=scale,
        )
        return dq, dk, dv
    raise ValueError(f"no fused kernel {kernel!r}")


# --------------------------------------------------------------------------
# The fused kernels as custom ops. Under torch.compile, Inductor chooses the
# layout of every buffer it passes to an op; the layouts these kernels need
# (cuDNN: a log-sum-exp with unit last stride, out/grad_out in exactly q's
# strides) must hold at run time, so they are made inside the op, on the
# real tensors, and not decided on the traced ones. The fake implementation
# is the same code on fake tensors (the aten ops' meta kernels), so traced
# output layouts are the real ones; `needs_exact_strides` makes Inductor
# pass inputs with exactly the traced strides.

_EXACT_STRIDES = tuple(t for t in (getattr(torch.Tag, "needs_exact_strides", None),) if t is not None)


@opaque_op("dilated_compile::block_attention", tags=_EXACT_STRIDES)
def block_attention_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, is_causal: bool, scale: float, kernel: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) of the fused kernel `kernel` on dense blocks."""
    return _forward_impl(kernel, q, k, v, is_causal, scale)


@block_attention_op.register_fake
def _(q, k, v, is_causal, scale, kernel):
    return _forward_impl(kernel, q, k, v, is_causal, scale)


@opaque_op("dilated_compile::block_attention_backward", tags=_EXACT_STRIDES)
def block_attention_backward_op(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    is_causal: bool,
    scale: float,
    kernel: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of the fused kernel `kernel` from an output and log-sum-exp."""
    return _backward_impl(kernel, dout, q, k, v, out, lse, is_causal, scale)


@block_attention_backward_op.register_fake
def _(dout, q, k, v, out, lse, is_causal, scale, kernel):
    return _backward_impl(kernel, dout, q, k, v, out, lse, is_causal, scale)


def block_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    is_causal: bool,
    scale: float,
    direct: bool = False,
) -> BlockResult:
    """Dense attention per (batch, head) block with its log-sum-exp. No autograd.

    ``direct=True`` calls the kernel without the custom op around it: for
    real tensors outside tracing (inside another op), where the op's dispatch
    would only add host time.
    """
    kernel = choose_kernel(q, k)
    if kernel == "math":
        return BlockResult(*_math_forward(q, k, v, is_causal, scale))
    if direct:
        return BlockResult(*_forward_impl(kernel, q, k, v, bool(is_causal), float(scale)))
    return BlockResult(*block_attention_op(q, k, v, bool(is_causal), float(scale), kernel))


def block_attention_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    *,
    is_causal: bool,
    scale: float,
    direct: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of `block_attention` for q, k, v given an output and log-sum-exp.

    `out` and `lse` may be the merged result of several blocks that share these
    queries: the gradient then is that of one softmax over all of their keys.
    ``direct`` as in `block_attention`.
    """
    kernel = choose_kernel(q, k)
    if kernel == "math":
        return _math_backward(dout, q, k, v, out, lse, is_causal, scale)
    if direct:
        return _backward_impl(kernel, dout, q, k, v, out, lse, bool(is_causal), float(scale))
    return block_attention_backward_op(
        dout, q, k, v, out, lse, bool(is_causal), float(scale), kernel
    )
