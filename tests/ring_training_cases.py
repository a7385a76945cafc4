"""Ring cases of `tests/ring_worker.py` on the example model (examples/ring_gpt.py): a few
training steps under the ring, directly and through the backend, equal single-process training."""

from __future__ import annotations

import functools
import os
import sys

import torch

from . import ring_common
from .ring_common import CaseFailure, _inner_kwargs, _ring_policy


def _example_gpt(seq_len: int):
    """(module ring_gpt, ids, labels, model, an identical copy) of the example GPT at seq_len."""
    examples = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
    if examples not in sys.path:
        sys.path.insert(0, examples)
    import copy

    import ring_gpt

    torch._dynamo.reset()
    kwargs = dict(n_layer=2, n_head=4, n_embd=32, vocab=64, block_size=seq_len)
    idx, labels = ring_gpt.make_batch(2, seq_len, kwargs["vocab"], ring_common.DEVICE)
    model = ring_gpt.build(kwargs, ring_common.DEVICE, torch.float32)
    return ring_gpt, idx, labels, model, copy.deepcopy(model)


def _check_losses(ring_losses, single) -> None:
    for step, (a, b) in enumerate(zip(ring_losses, single)):
        if abs(a - b) > 1e-5 * abs(b):
            raise CaseFailure(f"step {step}: ring loss {a} != single-process loss {b}")


def gpt_training_case(mode: str, steps: int = 2, seq_len: int = 48) -> None:
    """examples/ring_gpt.py's sequence-parallel training against single-process training.

    mode "direct": attention calls ring_attention; "backend": the dilated
    backend rewrites the sites with examples/policies/gpt_ring.yaml.
    """
    ring_gpt, idx, labels, model, reference = _example_gpt(seq_len)
    ring_losses, logits = ring_gpt.train_ring(model, idx, labels, steps, mode)
    if not ring_gpt.check_logits(logits, reference, idx):
        raise CaseFailure("first-step logits differ from the single-process model's")
    single = ring_gpt.train_single(reference, idx, labels, steps)
    _check_losses(ring_losses, single)


def gpt_training_inner_case(inner: str, setup: str, steps: int = 2, seq_len: int = 48) -> None:
    """Training the example model through the backend with a ring rule whose inner attention
    sends data at every site (two layers: the collectives of several sites in one forward and
    one backward graph) == single-process training with the same attention, eager."""
    from dilated_compile import dilated_attention
    from dilated_compile.lowering.block_sparse.attention import block_sparse_attention

    ring_gpt, idx, labels, model, reference = _example_gpt(seq_len)
    policy = _ring_policy(inner, ring_gpt.LAYOUT, setup)
    policy["rules"][0]["match"] = "**.blocks.*.attn"
    ring_losses, _ = ring_gpt.train_ring(model, idx, labels, steps, "backend", policy=policy)
    inner_kwargs = _inner_kwargs(inner, setup)
    attend = functools.partial(
        dilated_attention if inner == "dilated" else block_sparse_attention, is_causal=True,
        **{key: (list(val) if key != "pattern" and isinstance(val, tuple) else val)
           for key, val in inner_kwargs.items()},
    )
    for module in reference.modules():  # eager, on the full sequence
        if hasattr(module, "reference"):
            module.reference = attend
    single = ring_gpt.train_single(reference, idx, labels, steps)
    _check_losses(ring_losses, single)
