"""Small models with SDPA attention written in the calling styles real code uses."""

import torch
import torch.utils.checkpoint
import torch.nn as nn
import torch.nn.functional as F


class SelfAttention(nn.Module):
    """Causal or full self-attention; `style` picks how SDPA is called."""

    def __init__(self, dim, heads, head_dim=8, style="positional", is_causal=True, scale=None,
                 dropout=0.0, mask=False):
        super().__init__()
        self.heads, self.head_dim, self.style = heads, head_dim, style
        self.is_causal, self.scale, self.dropout, self.mask = is_causal, scale, dropout, mask
        self.qkv = nn.Linear(dim, 3 * heads * head_dim)
        self.proj = nn.Linear(heads * head_dim, dim)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        p = self.dropout if self.training else 0.0
        if self.mask:
            keep = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
            pad = torch.ones(b, 1, 1, n, dtype=torch.bool, device=x.device)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=keep & pad)
        elif self.style == "positional":
            y = F.scaled_dot_product_attention(q, k, v, None, p, self.is_causal, scale=self.scale)
        else:
            y = F.scaled_dot_product_attention(
                query=q, key=k, value=v, dropout_p=p, is_causal=self.is_causal, scale=self.scale
            )
        return self.proj(y.transpose(1, 2).reshape(b, n, -1))


class Block(nn.Module):
    def __init__(self, dim, heads, **kw):
        super().__init__()
        self.ln = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, heads, **kw)

    def forward(self, x):
        return x + self.attn(self.ln(x))


class TinyModel(nn.Module):
    """`layers.<i>.attn` are the attention sites."""

    def __init__(self, dim=16, heads=(5, 3), **kw):
        super().__init__()
        self.layers = nn.ModuleList([Block(dim, h, **kw) for h in heads])

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


class WindowedAttention(nn.Module):
    """SDPA with a sliding window that the module declares in `sliding_window` (as HF attention
    modules do) and builds into its mask for the length it is given: i - W < j <= i (causal) or
    |i - j| < W. Where the window is at least that length the mask is the causal mask (no mask
    when bidirectional)."""

    def __init__(self, window: int, causal: bool = True):
        super().__init__()
        self.sliding_window, self.causal = window, causal

    def forward(self, q, k, v):
        i = torch.arange(q.shape[-2], device=q.device)
        d = i[:, None] - i[None, :]
        keep = ((d >= 0) & (d < self.sliding_window)) if self.causal else d.abs() < self.sliding_window
        return F.scaled_dot_product_attention(q, k, v, attn_mask=keep)


def dilated_rule(match="layers.*.attn", seg=(8, 16), rates=(1, 2), head_split="groups", **extra):
    return {"match": match, "attention": "dilated", "segment_lengths": list(seg),
            "dilation_rates": list(rates), "head_split": head_split, **extra}


def policy(*rules, strict=False, **defaults):
    doc = {"version": 1, "strict": strict, "rules": list(rules)}
    if defaults:
        doc["defaults"] = defaults
    return doc


def with_attention_replaced(model, fn):
    """Run `model` with every SelfAttention's SDPA replaced by fn(q, k, v, module)."""
    originals = {}

    def patched(module):
        def forward(x):
            b, n, _ = x.shape
            q, k, v = module.qkv(x).view(b, n, 3, module.heads, module.head_dim).permute(2, 0, 3, 1, 4)
            y = fn(q, k, v, module)
            return module.proj(y.transpose(1, 2).reshape(b, n, -1))
        return forward

    for m in model.modules():
        if isinstance(m, SelfAttention):
            originals[m] = m.forward
            m.forward = patched(m)
    return originals


def restore(originals):
    for m, f in originals.items():
        m.forward = f


class CheckpointedBlocks(torch.nn.Module):
    """TinyModel with every block under torch.utils.checkpoint (non-reentrant)."""

    def __init__(self, heads: tuple[int, ...]):
        super().__init__()
        self.inner = TinyModel(heads=heads)

    def forward(self, x):
        for layer in self.inner.layers:
            x = torch.utils.checkpoint.checkpoint(layer, x, use_reentrant=False)
        return x


def rewritten_eager(model, policy):
    """`model` compiled with the rewrite under `policy`, its graphs run eagerly (no Inductor)."""
    from dilated_compile import load_policy
    from dilated_compile.passes import run_passes

    loaded = load_policy(policy)

    def backend(gm, inputs, **_):
        return run_passes(gm, loaded)[0].forward

    return torch.compile(model, backend=backend)
