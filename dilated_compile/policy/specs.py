"""What each strategy is given: the per-strategy settings of a rule and block patterns.

Frozen dataclasses with no dependency on the rest of the policy package:
this is all the lowering imports from it.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "SCHEMA_VERSION",
    "ATTENTION_KINDS",
    "HEAD_SPLITS",
    "RING_LAYOUTS",
    "PATTERN_KINDS",
    "DilatedSpec",
    "BlockPattern",
    "BlockSparseSpec",
    "RingSpec",
]

SCHEMA_VERSION = 1
ATTENTION_KINDS = ("dense", "dilated", "block_sparse")
HEAD_SPLITS = ("groups", "longnet")
RING_LAYOUTS = ("contiguous", "zigzag")
PATTERN_KINDS = ("local_window", "dilated", "global_local", "mask_mod")


@dataclass(frozen=True)
class DilatedSpec:
    """Dilated attention: one (segment length, dilation rate) pattern per entry."""

    segment_lengths: tuple[int, ...]
    dilation_rates: tuple[int, ...]
    head_split: str = "groups"  # "groups" | "longnet"

    def describe(self) -> str:
        """Short text, e.g. ``w=[2048,4096] r=[1,2] longnet``."""
        w = ",".join(map(str, self.segment_lengths))
        r = ",".join(map(str, self.dilation_rates))
        return f"w=[{w}] r=[{r}] {self.head_split}"


@dataclass(frozen=True)
class BlockPattern:
    """Which key blocks each query block attends to.

    Built from a mapping such as ``{kind: local_window, window: 2}`` by
    :func:`dilated_compile.policy.parse_pattern`, which checks it.
    """

    kind: str  # "local_window" | "dilated" | "global_local" | "mask_mod"
    window: int | None = None
    stride: int | None = None
    global_blocks: int | None = None
    function: str | None = None  # mask_mod: "package.module:name"
    # A token-level sliding window on top of the pattern: key j is allowed for query i only
    # when |i - j| < token_window (with causal masking: i - token_window < j <= i). Set for
    # attention whose mask is a sliding window; not a policy key.
    token_window: int | None = None

    def as_tuple(self) -> tuple:
        """The fields in order: ``BlockPattern(*p.as_tuple()) == p`` (plain values for caches
        and Dynamo constants)."""
        return (self.kind, self.window, self.stride, self.global_blocks, self.function, self.token_window)

    def describe(self) -> str:
        """Short text, e.g. ``local_window(window=2)``, ``local_window(window=1) & token window 8``."""
        tail = "" if self.token_window is None else f" & token window {self.token_window}"
        if self.kind == "mask_mod":
            return f"mask_mod({self.function}){tail}"
        fields = [
            f"{name}={getattr(self, name)}"
            for name in ("global_blocks", "stride", "window")
            if getattr(self, name) is not None
        ]
        return f"{self.kind}({', '.join(fields)}){tail}"


@dataclass(frozen=True)
class BlockSparseSpec:
    """Block-sparse attention: block size and pattern."""

    block_size: int
    pattern: BlockPattern

    def describe(self) -> str:
        """Short text, e.g. ``b=128 local_window(window=2)``."""
        return f"b={self.block_size} {self.pattern.describe()}"


@dataclass(frozen=True)
class RingSpec:
    """Ring attention over a process group."""

    layout: str = "contiguous"  # "contiguous" | "zigzag"
    group: str | None = None  # name given to dilated_compile.register_group; None = world

    def describe(self) -> str:
        """Short text, e.g. ``ring=zigzag@tp``."""
        return f"ring={self.layout}" + (f"@{self.group}" if self.group else "")
