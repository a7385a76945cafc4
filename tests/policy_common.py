"""What the policy tests share: the example policy of docs/spec.md as YAML and as a dict,
writing a policy file, and the PolicyError that loading a policy raises."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from dilated_compile.policy import PolicyError, load_policy

SPEC_EXAMPLE = r"""version: 1
strict: false                 # true: a targeted site that cannot be rewritten is an error
defaults:                     # merged under every rule
  min_seq_len: 4096           # rule applies only where the key length is at least this
rules:                        # first match wins
  - match: "transformer.h.*.attn"        # glob on the dotted module path
    attention: dilated                   # dense | dilated | block_sparse
    segment_lengths: [2048, 4096, 8192]
    dilation_rates: [1, 2, 4]
    head_split: longnet
    ring: {layout: zigzag}               # optional; `group:` names a process group
  - match: "re:^encoder\\.layer\\.[0-3]\\."  # "re:" prefix = regular expression
    attention: block_sparse
    block_size: 128
    pattern: {kind: local_window, window: 2}
"""

SPEC_EXAMPLE_DICT = {
    "version": 1,
    "strict": False,
    "defaults": {"min_seq_len": 4096},
    "rules": [
        {
            "match": "transformer.h.*.attn",
            "attention": "dilated",
            "segment_lengths": [2048, 4096, 8192],
            "dilation_rates": [1, 2, 4],
            "head_split": "longnet",
            "ring": {"layout": "zigzag"},
        },
        {
            "match": "re:^encoder\\.layer\\.[0-3]\\.",
            "attention": "block_sparse",
            "block_size": 128,
            "pattern": {"kind": "local_window", "window": 2},
        },
    ],
}



def write(tmp_path: Path, text: str, name: str = "policy.yaml") -> Path:
    """Write a policy file and return its path."""
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def error_of(policy: object) -> PolicyError:
    """The PolicyError that loading `policy` raises."""
    with pytest.raises(PolicyError) as info:
        load_policy(policy)  # type: ignore[arg-type]
    return info.value


def file_error(tmp_path: Path, text: str) -> PolicyError:
    """The PolicyError for a YAML text, checking that it names the file."""
    path = write(tmp_path, text)
    err = error_of(str(path))
    assert err.file == str(path)
    assert str(err).startswith(str(path))
    return err
