"""What the training tests share: a fresh Dynamo, counters and report list for each test, the
repository root, the dilated setup, and a model's copy with float64 reference attention."""

import copy
from pathlib import Path

import pytest
import torch
from torch._dynamo.utils import counters

import dilated_compile
from dilated_compile import dilated_reference

from .models import with_attention_replaced

ROOT = Path(__file__).resolve().parents[1]
SEG, RATES = (8, 16), (1, 2)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    dilated_compile.clear_reports()
    yield
    torch._dynamo.reset()


def _reference_model(model, head_split, min_seq_len=0):
    """`model` copied, its attention replaced by the float64 reference (dense below min_seq_len)."""
    ref = copy.deepcopy(model)

    def attention(q, k, v, module):
        if q.shape[2] < min_seq_len:
            seg, rates, split = (q.shape[2],), (1,), "groups"
        else:
            seg, rates, split = SEG, RATES, head_split
        return dilated_reference(q, k, v, seg, rates, head_split=split, is_causal=True).to(q.dtype)

    return ref, with_attention_replaced(ref, attention)
