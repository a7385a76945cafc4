"""Sequence-parallel training of causal language models: sharding a batch and reducing its loss.

With a ring, every rank of the context-parallel group holds one shard of each
sequence. Two things then differ from ordinary training:

- labels must be shifted on the whole sequence *before* it is cut, so that
  the last token of a shard predicts the first token of the next shard, and
  the model needs the tokens' global positions (`shard_causal_lm_batch`);
- the mean loss is a mean over the tokens of every rank, and its gradient
  must come out right after the data-parallel gradient averaging (FSDP2's
  reduce-scatter divides by the number of ranks it reduces over)
  (`causal_lm_loss`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .sharding import GroupLike, resolve_group, shard

IGNORE_INDEX = -100  # what torch's cross_entropy and HF's models ignore by default


def _as_group(group: Any) -> GroupLike:
    """A ProcessGroup, a registered name or None for `group`, which may also be a 1-D DeviceMesh."""
    if hasattr(group, "get_group") and hasattr(group, "ndim"):  # DeviceMesh
        if group.ndim != 1:
            raise ValueError(
                f"the DeviceMesh has {group.ndim} dimensions; pass one dimension, e.g. mesh['cp'], "
                "or a flattened one, e.g. mesh['dp', 'cp']._flatten()"
            )
        return group.get_group()
    return group


def shift_labels(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Next-token targets: position i gets ``labels[:, i + 1]``, the last position `ignore_index`."""
    if labels.dim() < 2:
        raise ValueError(f"labels must be (batch, seq, ...), got shape {tuple(labels.shape)}")
    end = torch.full_like(labels[:, :1], ignore_index)
    return torch.cat([labels[:, 1:], end], dim=1)


def shard_causal_lm_batch(
    input_ids: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    layout: str = "zigzag",
    group: Any = None,
    ignore_index: int = IGNORE_INDEX,
    **per_token: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """This rank's shard of a causal-LM batch whose sequences are cut over the ranks of `group`.

    `input_ids` and `labels` are ``(batch, seq)`` and hold the whole
    sequences, the same on every rank of `group` (the ring's process group: a
    registered name, a ProcessGroup or a 1-D DeviceMesh such as ``mesh["cp"]``;
    None for the world group). `labels` defaults to `input_ids`; they are
    *unshifted*, as HF models take them: this function shifts them on the whole
    sequence first, so each shard's last token predicts the first token of the
    next shard, and the sequence's last token gets `ignore_index`. Every other
    keyword is a per-token tensor with the sequence in dim 1 (a loss mask, say),
    cut as it is.

    Returns ``input_ids``, ``labels`` (shifted: the targets of the positions
    held here), ``position_ids`` (the global positions held here, ``(batch,
    n_local)``) and the other tensors, each this rank's shard in `layout`
    (`dilated_compile.shard`). Pass ``input_ids`` and ``position_ids`` to the
    model, not ``labels`` (HF models shift labels inside, within the shard), and
    give the logits and ``labels`` to `causal_lm_loss`.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (batch, seq), got shape {tuple(input_ids.shape)}")
    batch, seq_len = input_ids.shape
    labels = input_ids if labels is None else labels
    full = {"input_ids": input_ids, "labels": shift_labels(labels, ignore_index)}
    full["position_ids"] = torch.arange(seq_len, device=input_ids.device).expand(batch, seq_len)
    for name, tensor in per_token.items():
        if tensor.dim() < 2 or tuple(tensor.shape[:2]) != (batch, seq_len):
            raise ValueError(
                f"{name} must be (batch, seq, ...) = ({batch}, {seq_len}, ...) like input_ids, "
                f"got shape {tuple(tensor.shape)}"
            )
        full[name] = tensor
    if tuple(full["labels"].shape[:2]) != (batch, seq_len):
        raise ValueError(f"labels must have the shape of input_ids {(batch, seq_len)}, got {tuple(labels.shape)}")
    ring = _as_group(group)
    return {name: shard(tensor, 1, layout, ring).contiguous() for name, tensor in full.items()}


def causal_lm_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    group: Any = None,
    grad_divide_factor: float | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """The mean next-token loss of the global batch, from this rank's shard of it.

    `logits` ``(batch, n_local, vocab)`` and `labels` ``(batch, n_local)`` are
    this rank's shard (`labels` already shifted: what `shard_causal_lm_batch`
    returns). `group` is every rank that holds part of the global batch: the
    data-parallel and context-parallel ranks together (a ProcessGroup, a
    registered name, or a 1-D DeviceMesh such as ``mesh["dp", "cp"]._flatten()``;
    None for the world group). A collective over `group`: every rank calls it.

    The value returned is the global mean loss (sum of the token losses of all
    ranks over the number of tokens not equal to `ignore_index` in the whole
    batch), the same on every rank. Its gradient is `grad_divide_factor` times
    the gradient of this rank's part of that mean (its token losses' sum over the
    global count), so that a data-parallel reduction that divides the summed
    gradients by `grad_divide_factor` gives exactly the gradient of the global
    mean loss. The default is the size of `group`: what FSDP2 divides by when it
    reduces over that group (with ``set_gradient_divide_factor(1.0)`` on the
    model, pass 1.0).
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(
            f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} do not match: "
            "expected (batch, n, vocab) logits for (batch, n) labels"
        )
    pg = resolve_group(_as_group(group))
    world = 1 if pg is None else dist.get_world_size(pg)
    factor = float(world if grad_divide_factor is None else grad_divide_factor)
    flat_labels = labels.reshape(-1)
    flat_logits = logits.reshape(-1, logits.shape[-1])
    if flat_logits.dtype not in (torch.float32, torch.float64):
        flat_logits = flat_logits.float()  # half-precision logits: the loss in float32
    total = F.cross_entropy(flat_logits, flat_labels, ignore_index=ignore_index, reduction="sum")
    # float64: token counts stay exact beyond 2**24
    stats = torch.stack([total.detach().double(), (flat_labels != ignore_index).sum().double()])
    if world > 1:
        dist.all_reduce(stats, group=pg)
    count = stats[1].clamp(min=1)
    global_mean = (stats[0] / count).to(total.dtype)
    scaled = total * (factor / count).to(total.dtype)
    return global_mean + (scaled - scaled.detach())


__all__ = ["IGNORE_INDEX", "causal_lm_loss", "shard_causal_lm_batch", "shift_labels"]
