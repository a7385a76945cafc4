"""The policy file: which attention sites become what.

A policy is YAML (or a dict of the same shape, or an already loaded
:class:`Policy`), schema version 1::

    version: 1
    strict: false
    defaults:
      min_seq_len: 4096
    rules:
      - match: "transformer.h.*.attn"
        attention: dilated
        segment_lengths: [2048, 4096, 8192]
        dilation_rates: [1, 2, 4]
        head_split: longnet
        ring: {layout: zigzag}
      - match: "re:^encoder\\.layer\\.[0-3]\\."
        attention: block_sparse
        block_size: 128
        pattern: {kind: local_window, window: 2}

:func:`load_policy` turns it into frozen dataclasses, and reports anything
wrong as a :class:`PolicyError` naming the file, the line, the dotted key
and what was expected. The modules:

* :mod:`.specs`: the per-strategy settings, :class:`BlockPattern` and
  :class:`RingSpec` (all that the lowering imports);
* :mod:`.model`: :class:`Rule` and :class:`Policy`;
* :mod:`.matching`: what a rule's ``match`` matches (globs and ``re:``);
* :mod:`.loader`: YAML to plain values, with the line of every key;
* :mod:`.validate`: checking a document, one table entry per attention kind;
* :mod:`.patterns`: checking a block-sparse pattern mapping
  (:func:`parse_pattern`);
* :mod:`.values`, :mod:`.errors`: checks of single values, and the error.
"""

from .errors import PolicyError
from .model import Policy, Rule
from .specs import (
    ATTENTION_KINDS,
    HEAD_SPLITS,
    PATTERN_KINDS,
    RING_LAYOUTS,
    SCHEMA_VERSION,
    BlockPattern,
    BlockSparseSpec,
    DilatedSpec,
    RingSpec,
)
from .patterns import parse_pattern
from .validate import load_policy

__all__ = [
    "PolicyError",
    "DilatedSpec",
    "BlockPattern",
    "BlockSparseSpec",
    "RingSpec",
    "Rule",
    "Policy",
    "load_policy",
    "parse_pattern",
    "SCHEMA_VERSION",
    "ATTENTION_KINDS",
    "HEAD_SPLITS",
    "PATTERN_KINDS",
    "RING_LAYOUTS",
]
