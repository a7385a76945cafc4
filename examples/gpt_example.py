"""A small GPT compiled with backend="dilated", checked against a float64 reference.

    python examples/gpt_example.py [--policy examples/policies/gpt_longnet.yaml] [--seq-len 1024]

The model is plain PyTorch (nanoGPT-style) and knows nothing about dilated
attention: its attention is `F.scaled_dot_product_attention(..., is_causal=True)`.
The policy file decides which attention sites the backend rewrites. The script
prints the site report, compares the compiled logits with the same model run
in float64 with each attention replaced by `dilated_compile.dilated_reference`
or `block_sparse_reference` as its rule says (dense float64 attention where
the policy leaves the site alone), and runs
one training step through the compiled model. Exit code 1 on a mismatch.
"""

from __future__ import annotations

import argparse
import copy
import functools
import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

import dilated_compile
from dilated_compile import reports

HERE = os.path.dirname(os.path.abspath(__file__))
# policies name their mask functions from the repository root ("examples.masks:...")
sys.path.insert(0, os.path.dirname(HERE))


class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.qkv = nn.Linear(n_embd, 3 * n_embd)
        self.proj = nn.Linear(n_embd, n_embd)
        self.reference = None  # when set: a function (q, k, v) -> y replacing SDPA

    def forward(self, x):
        B, T, C = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.n_head, C // self.n_head)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, H, T, D)
        if self.reference is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            y = self.reference(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class Block(nn.Module):
    def __init__(self, n_embd: int, n_head: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd)
        self.attn = CausalSelfAttention(n_embd, n_head)
        self.ln_2 = nn.LayerNorm(n_embd)
        self.mlp = nn.Sequential(
            nn.Linear(n_embd, 4 * n_embd), nn.GELU(), nn.Linear(4 * n_embd, n_embd)
        )

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, n_layer: int, n_head: int, n_embd: int, vocab: int, block_size: int):
        super().__init__()
        self.block_size = block_size
        self.tok_emb = nn.Embedding(vocab, n_embd)
        self.pos_emb = nn.Embedding(block_size, n_embd)
        self.blocks = nn.ModuleList(Block(n_embd, n_head) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd)
        self.lm_head = nn.Linear(n_embd, vocab, bias=False)

    def forward(self, idx):
        T = idx.shape[1]
        pos = torch.arange(T, device=idx.device)
        x = self.tok_emb(idx) + self.pos_emb(pos)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def make_model(n_layer=4, n_head=6, n_embd=96, vocab=256, block_size=4096) -> GPT:
    assert n_embd % n_head == 0, "n_embd must be divisible by n_head"
    return GPT(n_layer, n_head, n_embd, vocab, block_size)


def reference_logits(model: GPT, idx: torch.Tensor, policy, seq_len: int) -> torch.Tensor:
    """The model's logits in float64 on CPU, each attention as the policy defines it."""
    ref = copy.deepcopy(model).to("cpu", torch.float64)
    for name, module in ref.named_modules():
        if not isinstance(module, CausalSelfAttention):
            continue
        rule = policy.rule_for(name)
        applies = rule is not None and seq_len >= rule.min_seq_len
        if applies and rule.dilated is not None:
            spec = rule.dilated
            module.reference = functools.partial(
                dilated_compile.dilated_reference,
                segment_lengths=spec.segment_lengths,
                dilation_rates=spec.dilation_rates,
                head_split=spec.head_split,
                is_causal=True,
            )
        elif applies and rule.block_sparse is not None:
            module.reference = functools.partial(
                dilated_compile.block_sparse_reference,
                block_size=rule.block_sparse.block_size,
                pattern=rule.block_sparse.pattern,
                is_causal=True,
            )
        else:  # no rule, a dense rule, or shorter than min_seq_len: ordinary attention
            module.reference = functools.partial(dilated_compile.dense_reference, is_causal=True)
    with torch.no_grad():
        return ref(idx.cpu())


def main(argv=None) -> int:
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", default=os.path.join(HERE, "policies", "gpt_dilated.yaml"))
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--device", default="cuda" if cuda else "cpu")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float32 on cpu")
    args = parser.parse_args(argv)
    dtype_name = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    dtype = getattr(torch, dtype_name)

    torch.manual_seed(0)
    model = make_model().to(args.device, dtype).eval()  # no dropout: eval == train here
    if not 1 <= args.seq_len <= model.block_size:
        parser.error(f"--seq-len must be between 1 and {model.block_size}")
    idx = torch.randint(0, 256, (args.batch, args.seq_len), device=args.device)
    policy = dilated_compile.load_policy(args.policy)

    compiled = torch.compile(model, backend="dilated", options={"policy": args.policy})
    logits = compiled(idx)

    for report in reports():
        print(report)
        for warning in report.warnings:
            print("warning:", warning)
    counts = torch._dynamo.utils.counters["dilated"]
    print(f"sites rewritten: {counts['rewritten']}, left: {counts['left']}\n")

    # Compare with the float64 reference.
    expected = reference_logits(model, idx, policy, args.seq_len)
    err = (logits.detach().cpu().double() - expected).abs().max().item()
    scale = expected.abs().max().item()
    tol = (1e-3 if dtype in (torch.float32, torch.float64) else 5e-2) * scale  # bf16/fp16: 5e-2
    ok = err <= tol
    print(f"logits {tuple(logits.shape)} {dtype_name}: max |compiled - float64 reference| = "
          f"{err:.3e} (max |logit| {scale:.3f}, tolerance {tol:.3e}) {'OK' if ok else 'MISMATCH'}")

    # One training step through the compiled model (same graph, now with backward).
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    targets = torch.roll(idx, -1, dims=1)
    loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
    loss.backward()
    grads_finite = all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    opt.step()
    print(f"training step: loss {loss.item():.4f}, gradients finite: {grads_finite}")
    return 0 if ok and grads_finite else 1


if __name__ == "__main__":
    sys.exit(main())
