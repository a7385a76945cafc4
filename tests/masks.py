"""mask_mod functions importable by path, for block_sparse policies in tests."""

import torch


def stripes(b, h, q_idx, kv_idx):
    """Token-level pattern that depends on the head: not expressible per block."""
    return ((q_idx + kv_idx + h) % 3 == 0) | (q_idx == kv_idx)


def nothing_before_16(b, h, q_idx, kv_idx):
    """Queries 0..15 see no key at all; later queries see keys 8.. ."""
    return (q_idx >= 16) & (kv_idx >= 8)
