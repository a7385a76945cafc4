"""One long-context training step of a small GPT under backend="dilated"; peak memory.

    python examples/long_context_train.py --seq-len 1048576            # one step, 1M tokens (GPU)
    python examples/long_context_train.py --sweep --out results/        # N = 64k .. 1M, JSON + PNG
    python examples/long_context_train.py --device cpu --seq-len 512 --n-embd 64   # tiny, on CPU

The model is a plain 4-layer GPT whose attention is `F.scaled_dot_product_attention(...,
is_causal=True)`; a policy written here (LongNet-style segments 2048..32768, rates
1..16) makes every block dilated. Each length runs a warm-up step (compiles), then a
measured AdamW step; the script prints the loss, the step time and the peak memory
(CUDA: `torch.cuda.max_memory_allocated` over the measured step; CPU: the process's
peak resident set size, which includes the compiler). With `--sweep` it fits peak
memory against N (least squares: bytes per token and intercept, relative residual)
and writes `peak_memory.json` and `peak_memory.png` to `--out`. Exit code 1 if a loss
or gradient is not finite.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

SWEEP_LENGTHS = [65536, 131072, 262144, 524288, 1048576]


class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.qkv = nn.Linear(n_embd, 3 * n_embd, bias=False)
        self.proj = nn.Linear(n_embd, n_embd, bias=False)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.n_head, c // self.n_head).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, c))


class Block(nn.Module):
    def __init__(self, n_embd: int, n_head: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd)
        self.attn = CausalSelfAttention(n_embd, n_head)
        self.ln_2 = nn.LayerNorm(n_embd)
        self.mlp = nn.Sequential(nn.Linear(n_embd, 4 * n_embd), nn.GELU(), nn.Linear(4 * n_embd, n_embd))

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


def sinusoidal_positions(t: int, dim: int, device, dtype) -> torch.Tensor:
    """(t, dim) fixed sinusoidal position codes (no table that grows with the length)."""
    pos = torch.arange(t, device=device, dtype=torch.float32).unsqueeze(1)
    freq = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / dim))
    angles = pos * freq
    return torch.cat([angles.sin(), angles.cos()], dim=1).to(dtype)


class GPT(nn.Module):
    """`blocks.<i>.attn` are the attention sites."""

    def __init__(self, n_layer: int, n_head: int, n_embd: int, vocab: int, checkpoint: bool = False):
        super().__init__()
        self.checkpoint = checkpoint
        self.tok_emb = nn.Embedding(vocab, n_embd)
        self.blocks = nn.ModuleList(Block(n_embd, n_head) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd)
        self.lm_head = nn.Linear(n_embd, vocab, bias=False)

    def forward(self, idx, targets):
        x = self.tok_emb(idx)
        x = x + sinusoidal_positions(idx.shape[1], x.shape[-1], x.device, x.dtype)
        for block in self.blocks:
            if self.checkpoint:
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


def make_policy(segments: list[int], rates: list[int], head_split: str) -> dict:
    return {
        "version": 1,
        "strict": True,  # a block that cannot be rewritten is an error, not a silent dense N^2
        "rules": [{"match": "blocks.*.attn", "attention": "dilated", "segment_lengths": segments,
                   "dilation_rates": rates, "head_split": head_split}],
    }


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_step(model, compiled, opt, seq_len: int, args, device) -> dict:
    """A warm-up step (compiles), then one measured AdamW step at `seq_len` tokens."""
    vocab = model.lm_head.out_features
    gen = torch.Generator(device="cpu").manual_seed(seq_len)
    idx = torch.randint(0, vocab, (args.batch, seq_len + 1), generator=gen).to(device)
    inputs, targets = idx[:, :-1], idx[:, 1:]
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step():
        with autocast:
            loss = compiled(inputs, targets)
        loss.backward()
        finite = all(p.grad is None or bool(torch.isfinite(p.grad).all()) for p in model.parameters())
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item(), finite

    t0 = time.perf_counter()
    step()
    _sync(device)
    compile_s = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    loss, finite = step()
    _sync(device)
    step_ms = (time.perf_counter() - t0) * 1e3
    return {"seq_len": seq_len, "batch": args.batch, "loss": loss, "grads_finite": finite,
            "peak_bytes": peak_memory_bytes(device), "step_ms": step_ms, "first_step_s": compile_s}


def fit_line(xs: list[float], ys: list[float]) -> dict:
    """Least-squares y = slope * x + intercept, and the largest residual relative to y."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else 0.0
    intercept = my - slope * mx
    worst = max(abs(y - (slope * x + intercept)) / y for x, y in zip(xs, ys)) if n else 0.0
    return {"bytes_per_token": slope, "intercept_bytes": intercept, "max_relative_residual": worst}


def write_plot(results: list[dict], fit: dict, path: str, title: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no PNG written", file=sys.stderr)
        return False
    xs = [r["seq_len"] for r in results]
    ys = [r["peak_bytes"] / 2**30 for r in results]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(xs, ys, "o-", label="measured peak (forward + backward + AdamW)")
    line = [(fit["bytes_per_token"] * x + fit["intercept_bytes"]) / 2**30 for x in xs]
    ax.plot(xs, line, "--", label=f"fit: {fit['bytes_per_token'] / 2**10:.1f} KiB/token")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sequence length N (tokens)")
    ax.set_ylabel("peak memory (GiB)")
    ax.set_title(title, fontsize=9)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=1048576)
    parser.add_argument("--sweep", action="store_true", help=f"run N = {SWEEP_LENGTHS} (GPU)")
    parser.add_argument("--lengths", default=None, help="comma-separated lengths for --sweep instead")
    parser.add_argument("--out", default=None, help="folder for peak_memory.json/.png (with --sweep)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--n-layer", type=int, default=4)
    parser.add_argument("--n-head", type=int, default=4)
    parser.add_argument("--n-embd", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=256)
    parser.add_argument("--segments", default="2048,4096,8192,16384,32768")
    parser.add_argument("--rates", default="1,2,4,8,16")
    parser.add_argument("--head-split", default="groups", choices=["groups", "longnet"])
    parser.add_argument("--checkpoint", action="store_true", help="activation checkpointing per block")
    parser.add_argument("--dynamic", action="store_true",
                        help="compile once for every length (custom-op path) instead of once per length")
    args = parser.parse_args(argv)

    import dilated_compile

    device = torch.device(args.device)
    torch.manual_seed(0)
    model = GPT(args.n_layer, args.n_head, args.n_embd, args.vocab, args.checkpoint).to(device)
    segments = [int(s) for s in args.segments.split(",")]
    rates = [int(r) for r in args.rates.split(",")]
    policy = make_policy(segments, rates, args.head_split)
    compiled = torch.compile(model, backend="dilated", options={"policy": policy}, dynamic=args.dynamic or False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sweep = [int(n) for n in args.lengths.split(",")] if args.lengths else SWEEP_LENGTHS
    lengths = sweep if args.sweep else [args.seq_len]

    results = []
    for n in lengths:
        r = train_step(model, compiled, opt, n, args, device)
        results.append(r)
        print(f"N={n:>8}  loss {r['loss']:.4f}  step {r['step_ms']:.1f} ms  first step {r['first_step_s']:.1f} s  "
              f"peak {'CUDA allocated' if device.type == 'cuda' else 'process RSS'} "
              f"{r['peak_bytes'] / 2**30:.3f} GiB  grads finite: {r['grads_finite']}", flush=True)
    sites = [s for rep in dilated_compile.reports() for s in rep.sites]
    print(f"attention sites rewritten: {sum(s.status == 'rewritten' for s in sites)} of {len(sites)} "
          f"({sites[-1].attention if sites else 'none'})")

    ok = all(math.isfinite(r["loss"]) and r["grads_finite"] for r in results)
    if args.sweep:
        fit = fit_line([r["seq_len"] for r in results], [r["peak_bytes"] for r in results])
        print(f"peak memory ~ {fit['bytes_per_token'] / 2**10:.2f} KiB/token * N + "
              f"{fit['intercept_bytes'] / 2**30:.3f} GiB (largest relative residual "
              f"{fit['max_relative_residual']:.3%})")
        if args.out:
            os.makedirs(args.out, exist_ok=True)
            name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
            doc = {"device": name, "torch": torch.__version__, "config": vars(args), "policy": policy,
                   "results": results, "fit": fit}
            with open(os.path.join(args.out, "peak_memory.json"), "w") as f:
                json.dump(doc, f, indent=2)
            title = (f"{name}, {args.n_layer}-layer GPT d={args.n_embd} h={args.n_head}, "
                     f"dilated {args.head_split} w={segments} r={rates}")
            write_plot(results, fit, os.path.join(args.out, "peak_memory.png"), title)
            print(f"wrote {args.out}/peak_memory.json and .png")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
