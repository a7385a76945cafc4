"""What the attention-form tests share: the dilated policy they rewrite with, its ground truth
(`dilated_attention` called eagerly, heads repeated for GQA), a fresh Dynamo for each test, and
a module around nn.MultiheadAttention with a causal, boolean or no mask."""

import pytest
import torch
import torch.nn as nn
from torch._dynamo.utils import counters

from dilated_compile import dilated_attention

from . import models

SEG, RATES, SPLIT = (4, 8), (1, 2), "longnet"
POLICY = {"version": 1, "rules": [{"match": "**", "attention": "dilated", "segment_lengths": list(SEG),
                                   "dilation_rates": list(RATES), "head_split": SPLIT}]}
STRICT = {**POLICY, "strict": True}
N = 10  # not a multiple of either segment


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def rewritten_eager(model, policy=POLICY):
    """`model` compiled with the rewrite (POLICY by default), run eagerly."""
    return models.rewritten_eager(model, policy)


def dilated(q, k, v, *, is_causal, scale=None):
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k, v = (t.repeat_interleave(groups, dim=1) for t in (k, v))
    return dilated_attention(q, k, v, SEG, RATES, head_split=SPLIT, is_causal=is_causal, scale=scale)



class MHA(nn.Module):
    def __init__(self, batch_first, mask):
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 4, batch_first=batch_first)
        self.mask = mask

    def forward(self, x):
        n = x.shape[1] if self.attn.batch_first else x.shape[0]
        if self.mask == "hint":
            mask, causal = nn.Transformer.generate_square_subsequent_mask(n), True
        elif self.mask == "bool":
            mask, causal = torch.ones(n, n, dtype=torch.bool).triu(1), False  # True = not allowed
        else:
            mask, causal = None, False
        return self.attn(x, x, x, need_weights=False, attn_mask=mask, is_causal=causal)[0]
