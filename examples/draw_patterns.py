"""Draw the block layout of each block-sparse pattern into docs/patterns/*.png.

    python examples/draw_patterns.py [--out docs/patterns] [--seq-len 2048] [--block-size 128]

One PNG per pattern (local_window, dilated, global_local and a mask_mod
example from examples/masks.py), non-causal and causal side by side. The
pictures are computed with the package's own functions, not redrawn by hand:
which token pairs are allowed comes from `token_mask_mod` evaluated with
`evaluate_mask_mod` (the mask_mod FlexAttention runs), and each 128 x 128
FlexAttention tile is coloured by its class from `tile_classes`: skipped,
partial (the mask_mod is evaluated inside it; allowed and masked tokens
drawn apart) or full (runs without a mask). With causal masking the diagonal
tiles are partial: causal is applied per token on global positions.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from dilated_compile.lowering.block_sparse.flex import TILE, tile_classes  # noqa: E402
from dilated_compile.lowering.block_sparse.patterns import (  # noqa: E402
    BUILTIN_KINDS,
    as_pattern,
    block_layout,
    density,
    evaluate_mask_mod,
    token_mask_mod,
)
from dilated_compile.policy import BlockPattern  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)
import masks  # noqa: E402  (examples/masks.py)

# pixel classes -> colours
SKIPPED, MASKED, ALLOWED, FULL = 0, 1, 2, 3
COLORS = ListedColormap(["#ffffff", "#fbe3c0", "#6fa8dc", "#1c4587"])
LEGEND = [
    Patch(facecolor="#1c4587", label="full tile (no mask evaluated)"),
    Patch(facecolor="#6fa8dc", label="partial tile: allowed"),
    Patch(facecolor="#fbe3c0", label="partial tile: masked"),
    Patch(facecolor="#ffffff", edgecolor="#999999", label="skipped tile"),
]

PATTERNS: dict[str, dict] = {
    "local_window": {"kind": "local_window", "window": 2},
    "dilated": {"kind": "dilated", "stride": 4, "window": 1},
    "global_local": {"kind": "global_local", "global_blocks": 2, "window": 1},
}
MASK_MOD_NAME = "mask_mod"  # examples/masks.py:sliding_window_with_sink


def token_allowed(pattern: BlockPattern, block_size: int, n: int, is_causal: bool) -> torch.Tensor:
    """(n, n) bool: which (query, key) token pairs the pattern allows."""
    mask_mod = token_mask_mod(pattern, block_size, is_causal)
    pos = torch.arange(n)
    return evaluate_mask_mod(mask_mod, 1, 1, pos, pos)[0, 0]


def classes_from_tokens(allowed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(any, full) per TILE x TILE tile, from the token-level mask (exact)."""
    n = allowed.shape[0]
    nt = -(-n // TILE)
    padded_any = torch.zeros(nt * TILE, nt * TILE, dtype=torch.bool)
    padded_all = torch.ones(nt * TILE, nt * TILE, dtype=torch.bool)
    padded_any[:n, :n] = allowed
    padded_all[:n, :n] = allowed
    any_ = padded_any.reshape(nt, TILE, nt, TILE).any(dim=3).any(dim=1)
    all_ = padded_all.reshape(nt, TILE, nt, TILE).all(dim=3).all(dim=1)
    return any_, all_ & any_


def pattern_picture(
    pattern: BlockPattern, block_size: int, n: int, is_causal: bool
) -> tuple[np.ndarray, dict[str, int]]:
    """(n, n) array of pixel classes (SKIPPED/MASKED/ALLOWED/FULL) and the tile counts.

    Built-in kinds take their tile classes from `tile_classes` (the closed
    form the GPU lowering uses) and are checked against the token mask: a
    tile with an allowed pair is never skipped, and a full tile has no masked
    pair. A mask_mod's classes come from its token mask, as the lowering
    computes them.
    """
    allowed = token_allowed(pattern, block_size, n, is_causal)
    exact_any, exact_full = classes_from_tokens(allowed)
    if pattern.kind in BUILTIN_KINDS:
        any_, full = tile_classes(pattern, block_size, n, is_causal, torch.device("cpu"))
        if bool((exact_any & ~any_).any()) or bool((full & ~exact_full).any()):
            raise AssertionError(f"tile_classes disagrees with the token mask for {pattern}")
    else:
        any_, full = exact_any, exact_full
    tile = torch.arange(n) // TILE
    t_any = any_[tile[:, None], tile[None, :]]
    t_full = full[tile[:, None], tile[None, :]]
    pixels = torch.full((n, n), SKIPPED, dtype=torch.int8)
    pixels[t_any & ~allowed] = MASKED
    pixels[t_any & allowed] = ALLOWED
    pixels[t_full] = FULL
    partial = any_ & ~full
    counts = {"full": int(full.sum()), "partial": int(partial.sum()), "skipped": int((~any_).sum())}
    return pixels.numpy(), counts


def describe(pattern: BlockPattern, name: str) -> str:
    """Title text: kind and parameters."""
    if pattern.kind == "mask_mod":
        return (f"mask_mod: {name} (window {masks.WINDOW} tokens + first {masks.SINK} tokens)")
    params = {"window": pattern.window, "stride": pattern.stride, "global_blocks": pattern.global_blocks}
    shown = ", ".join(f"{k}={v}" for k, v in params.items() if v is not None)
    return f"{pattern.kind}({shown})"


def draw(pattern: BlockPattern, name: str, block_size: int, n: int, path: str) -> None:
    """One PNG: the pattern non-causal (left) and causal (right)."""
    fig, axes = plt.subplots(1, 2, figsize=(7.6, 4.6))
    nb = -(-n // block_size)
    for ax, is_causal in zip(axes, (False, True)):
        pixels, counts = pattern_picture(pattern, block_size, n, is_causal)
        ax.imshow(pixels, cmap=COLORS, vmin=0, vmax=3, interpolation="nearest",
                  extent=(0, n, n, 0))
        for edge in range(0, n + 1, block_size):
            ax.axhline(edge, color="#bbbbbb", lw=0.4)
            ax.axvline(edge, color="#bbbbbb", lw=0.4)
        ticks = list(range(0, n + 1, block_size * max(1, nb // 4)))
        ax.set_xticks(ticks)
        ax.set_yticks(ticks)
        ax.tick_params(labelsize=7)
        ax.set_xlabel("key position", fontsize=8)
        ax.set_ylabel("query position", fontsize=8)
        sub = "causal" if is_causal else "non-causal"
        if pattern.kind in BUILTIN_KINDS and not is_causal:
            sub += f", {density(pattern, block_size, n):.0%} of blocks active"
        ax.set_title(f"{sub}\ntiles: {counts['full']} full, {counts['partial']} partial, "
                     f"{counts['skipped']} skipped", fontsize=8)
    fig.suptitle(f"{describe(pattern, name)}\nN={n}, block_size={block_size} ({nb}x{nb} blocks); "
                 f"colours: FlexAttention's {TILE}x{TILE} tiles", fontsize=9)
    fig.legend(handles=LEGEND, loc="lower center", ncol=4, fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> list[str]:
    """Draw every pattern; returns the paths written."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(HERE), "docs", "patterns"))
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--block-size", type=int, default=128)
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    n, block_size = args.seq_len, args.block_size
    todo: list[tuple[str, BlockPattern, str]] = []
    for name, spec in PATTERNS.items():
        pattern = as_pattern(spec, block_size)
        layout = block_layout(pattern, block_size, n)  # the (nb, nb) block layout
        print(f"{name}: {int(layout.sum())} of {layout.numel()} blocks active")
        todo.append((name, pattern, name))
    mask_pattern = as_pattern(masks.sliding_window_with_sink, block_size)
    todo.append((MASK_MOD_NAME, mask_pattern, "sliding_window_with_sink"))
    written = []
    for file_name, pattern, title_name in todo:
        path = os.path.join(args.out, f"{file_name}.png")
        draw(pattern, title_name, block_size, n, path)
        print("wrote", path)
        written.append(path)
    return written


if __name__ == "__main__":
    main()
