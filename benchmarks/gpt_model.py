"""The model the end-to-end training benchmark trains, and the dilated policies it compiles it with.

A GPT with rotary positions whose blocks call `F.scaled_dot_product_attention`
(or, for the `seed` backend, the seed algorithm of `bench_dilated.py`), and a
loss computed a chunk of tokens at a time so that the logits of a long sequence
never exist all at once.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

import dilated_compile
from bench_dilated import seed_algorithm

# LongNet's language-model setting (segments and rates, paired).
LONGNET_SEGMENTS = (2048, 4096, 8192, 16384, 32768)
LONGNET_RATES = (1, 2, 4, 6, 12)
ATTENTION_MATCH = r"re:(^|\.)attn$"
LOSS_CHUNK = 8192  # tokens per chunk of the (recomputed) output projection + cross-entropy


# ----------------------------------------------------------------------------- model


def rope_tables(pos: torch.Tensor, head_dim: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of rotary embeddings at positions `pos`, shape (N, 1, head_dim / 2)."""
    inv = 1.0 / (10000 ** (torch.arange(0, head_dim, 2, device=pos.device, dtype=torch.float32) / head_dim))
    angles = pos.float()[:, None] * inv[None, :]
    return angles.cos()[:, None, :].to(dtype), angles.sin()[:, None, :].to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, N, H, D) by the rotary tables (rotate-half convention)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class Attention(nn.Module):
    """Causal self-attention; SDPA on (B, H, N, D), or the seed algorithm when `seed` is set."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.proj = nn.Linear(width, width, bias=False)
        self.seed: tuple[list[int], list[int]] | None = None  # (segments, rates) for the seed backend
        # (segments, rates, head_split) of eager dilated_attention (reference losses)
        self.dilated: tuple[list[int], list[int], str] | None = None
        self.values_only = False  # the no_attention backend: v in place of attention's output

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, -1).unbind(2)  # (B, N, H, D) each
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.values_only:
            y = v
        elif self.seed is not None:
            y = seed_algorithm(q, k, v, self.seed[0], self.seed[1], is_causal=True)
        elif self.dilated is not None:
            y = dilated_compile.dilated_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), *self.dilated[:2],
                head_split=self.dilated[2], is_causal=True,
            ).transpose(1, 2)
        else:
            y = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
            ).transpose(1, 2)
        return self.proj(y.reshape(b, n, -1))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads)
        self.ln2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            nn.Linear(width, 4 * width, bias=False), nn.GELU(), nn.Linear(4 * width, width, bias=False)
        )

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), cos, sin)
        return x + self.mlp(self.ln2(x))


def _token_loss_sum(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = (h @ weight.t()).float()
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum", ignore_index=-100)


class GPT(nn.Module):
    """GPT with rotary positions and tied embeddings; forward returns the summed next-token loss."""

    def __init__(self, layers: int, width: int, heads: int, vocab: int):
        super().__init__()
        if width % heads or (width // heads) % 2:
            raise ValueError(f"--width {width} must be a multiple of --heads {heads} with an even head size")
        self.head_dim = width // heads
        self.tok_emb = nn.Embedding(vocab, width)
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(width)
        self.checkpoint_blocks = False  # recompute each block in backward (activation checkpointing)
        nn.init.normal_(self.tok_emb.weight, std=0.02)

    def forward(self, idx: torch.Tensor, pos: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        cos, sin = rope_tables(pos, self.head_dim, self.tok_emb.weight.dtype)
        x = self.tok_emb(idx)
        for block in self.blocks:
            if self.checkpoint_blocks:
                x = torch.utils.checkpoint.checkpoint(block, x, cos, sin, use_reentrant=False)
            else:
                x = block(x, cos, sin)
        h = self.ln_f(x)
        total = h.new_zeros((), dtype=torch.float32)
        for s in range(0, h.shape[1], LOSS_CHUNK):  # logits of one chunk at a time, recomputed in backward
            total = total + torch.utils.checkpoint.checkpoint(
                _token_loss_sum, h[:, s : s + LOSS_CHUNK], self.tok_emb.weight, labels[:, s : s + LOSS_CHUNK],
                use_reentrant=False,
            )
        return total


def count_params(model: nn.Module) -> int:
    """Number of parameters (tied weights counted once)."""
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------- policies


def clip_patterns(segments, rates, limit: int) -> tuple[list[int], list[int]]:
    """The (segment, rate) pairs with segment < limit, then the first longer one cut to `limit`."""
    seg_out, rate_out = [], []
    for w, r in zip(segments, rates):
        if w < limit:
            seg_out.append(w)
            rate_out.append(r)
        else:
            seg_out.append(limit)
            rate_out.append(r)
            break
    return seg_out, rate_out


def longnet_policy(segments, rates, min_seq_len: int, ring: bool = False, head_split: str = "longnet") -> dict:
    """A policy (dict) making every block's attention dilated (LongNet's segments and rates and,
    by default, its head split: every head uses every pattern)."""
    rule: dict[str, Any] = {
        "match": ATTENTION_MATCH,
        "attention": "dilated",
        "segment_lengths": list(segments),
        "dilation_rates": list(rates),
        "head_split": head_split,
    }
    if ring:
        rule["ring"] = {"layout": "zigzag"}
    return {"version": 1, "strict": True, "defaults": {"min_seq_len": min_seq_len}, "rules": [rule]}


def dense_ring_policy() -> dict:
    """A policy making every block's (causal) attention a dense zigzag ring."""
    rule = {"match": ATTENTION_MATCH, "attention": "dense", "ring": {"layout": "zigzag"}}
    return {"version": 1, "strict": True, "defaults": {"min_seq_len": 0}, "rules": [rule]}
