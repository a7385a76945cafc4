"""An attention function for HF transformers that builds each layer's mask inside the layer.

transformers builds a model's causal and sliding-window masks once, in the
model's forward, and hands them to every decoder layer. When each layer is
compiled as a frame of its own (FSDP2's ``fully_shard`` on each layer makes
it one: its hooks are not traced; so does compiling per block), a mask built
outside reaches the layer's graph as an input whose value the backend cannot
see: a sliding window cannot be proven, the site is left, and under a ring
rule that is an error on every rank. Causal layers are not affected (their
mask is None and SDPA gets ``is_causal=True``).

`register_layer_mask_attention` registers, under its own name, an attention
function that takes no mask from the model and builds the layer's mask from
the sequence length and the ``sliding_window`` the model passes for that
layer (None on full-attention layers): ``is_causal=True`` SDPA for a causal
layer, a constant sliding-window mask (key j for query i when i - W < j <= i,
what HF's sliding-window layers keep) for a window layer. Both are provable
inside the layer's compiled graph. The mask function registered with it
(`padding_only_mask`) builds no mask: the model hands the layers None, or
the padding mask when a padded one is given, which the attention rejects.
Sequences packed into one row (positions that restart) are not separated:
each row is one causal sequence.

Under a ring the mask is built on the rank's shard: its window must be
smaller than the shard (the backend reads W from it and keeps it on global
positions); a window as long as the shard or longer looks causal on the shard.
Sequences must not be padded (a padding mask raises) and the query and key
lengths must be equal (training, not generation with a cache).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

NAME = "sdpa_layer_mask"


def layer_mask_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """HF's attention-function signature: SDPA with the causal or sliding-window mask of the
    layer built here. Returns ``(output (batch, seq, heads, head_dim), None)``."""
    if attention_mask is not None:
        raise ValueError(
            f"attention '{NAME}' builds each layer's causal or sliding-window mask itself and takes "
            "no attention mask, but the model was given one (padding?). Pass unpadded sequences "
            "without attention_mask, or use attn_implementation='sdpa'."
        )
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if not causal:
        raise ValueError(f"attention '{NAME}' is for causal models; {type(module).__name__} is not causal")
    n, m = query.shape[-2], key.shape[-2]
    if n != m:
        raise ValueError(
            f"attention '{NAME}' needs as many keys as queries (training), got {n} queries and {m} keys "
            "(generation with a cache?): use attn_implementation='sdpa' for that"
        )
    groups = query.shape[1] // key.shape[1]
    if groups > 1:  # grouped-query attention: each key/value head serves `groups` query heads
        key, value = (t.repeat_interleave(groups, dim=1) for t in (key, value))
    if sliding_window is None:
        out = F.scaled_dot_product_attention(query, key, value, dropout_p=dropout, is_causal=True, scale=scaling)
    else:
        i = torch.arange(n, device=query.device)
        d = i[:, None] - i[None, :]
        keep = (d >= 0) & (d < sliding_window)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=keep, dropout_p=dropout, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def padding_only_mask(batch_size: int, q_length: int, kv_length: int, *args,
                      attention_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor | None:
    """HF's mask-function signature: no mask (the attention builds its own), unless a 2-D
    padding mask with a padded position was given, which is passed on (and then rejected)."""
    if attention_mask is None or bool(attention_mask.all()):
        return None
    return attention_mask


def register_layer_mask_attention(name: str = NAME) -> str:
    """Register `layer_mask_attention` with transformers' AttentionInterface, and
    `padding_only_mask` as its mask function, under `name`; return the name, for
    ``model.set_attn_implementation(name)`` (or ``attn_implementation=`` in the config)."""
    import transformers
    from transformers.masking_utils import AttentionMaskInterface

    transformers.AttentionInterface.register(name, layer_mask_attention)
    # without a mask function of its own, transformers would drop a padding mask silently
    AttentionMaskInterface.register(name, padding_only_mask)
    return name


__all__ = ["NAME", "layer_mask_attention", "padding_only_mask", "register_layer_mask_attention"]
