"""Train the example GPT a few steps with the sequence sharded across processes (ring attention).

    torchrun --nproc_per_node=2 examples/ring_gpt.py [--mode backend|direct|direct-compiled]

gloo on CPU when there is no GPU, NCCL (one GPU per process) otherwise.

Every rank builds the same model (same seed) and the same batch, and keeps
only its shard of the sequence (`dilated_compile.shard`, zigzag layout): token
ids, positions and next-token labels. Attention is then ring attention: each
rank's queries attend to the keys of the whole sequence, the key/value shards
travelling around the ranks. The loss is the mean over all tokens (each rank
sums its shard's losses and divides by the global count); parameter gradients
are summed over the ranks, as in any sequence-parallel training.

Modes:

- ``backend`` (default): the model is unchanged; ``torch.compile(model,
  backend="dilated", options={"policy": examples/policies/gpt_ring.yaml})``
  rewrites each attention site into ring attention.
- ``direct``: the model's attention calls `dilated_compile.ring_attention`
  itself, eagerly.
- ``direct-compiled``: the same under ``torch.compile`` (Inductor).

Rank 0 also trains an identical model on the full sequence in one process
and prints both loss curves; exit code 1 when they differ.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import functools
import os
import sys

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import dilated_compile  # noqa: E402
from dilated_compile import ring_attention, shard  # noqa: E402
from gpt_example import GPT, CausalSelfAttention, make_model  # noqa: E402

LAYOUT = "zigzag"
POLICY = os.path.join(HERE, "policies", "gpt_ring.yaml")


class PositionedGPT(nn.Module):
    """The example GPT, fed explicit (global) positions: a shard's positions are not 0..n-1."""

    def __init__(self, gpt: GPT):
        super().__init__()
        self.gpt = gpt

    def forward(self, idx: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        g = self.gpt
        x = g.tok_emb(idx) + g.pos_emb(pos)
        for block in g.blocks:
            x = block(x)
        return g.lm_head(g.ln_f(x))


def make_batch(batch: int, seq_len: int, vocab: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and next-token labels of the full sequence, the same on every rank."""
    g = torch.Generator().manual_seed(1234)
    tokens = torch.randint(0, vocab, (batch, seq_len + 1), generator=g)
    return tokens[:, :-1].to(device), tokens[:, 1:].to(device)


def build(model_kwargs: dict, device, dtype) -> PositionedGPT:
    """The model, identically initialised on every rank."""
    torch.manual_seed(0)
    return PositionedGPT(make_model(**model_kwargs)).to(device, dtype)


def use_ring_attention(model: nn.Module) -> None:
    """Make every attention block call ring_attention directly (modes direct*)."""
    ring = functools.partial(ring_attention, layout=LAYOUT, is_causal=True)
    for module in model.modules():
        if isinstance(module, CausalSelfAttention):
            module.reference = ring


def train_ring(
    model: PositionedGPT, idx, labels, steps: int, mode: str, lr: float = 1e-3, policy=POLICY
) -> tuple[list[float], torch.Tensor]:
    """Sequence-parallel training steps: (global mean loss of each step, first step's local logits).

    `policy` (mode backend): the ring policy, a path or a dict.
    """
    world = dist.get_world_size() if dist.is_initialized() else 1
    local_idx, local_labels = shard(idx, 1, LAYOUT), shard(labels, 1, LAYOUT)
    pos = shard(torch.arange(idx.shape[1], device=idx.device), 0, LAYOUT)
    n_tokens = labels.numel()
    if mode.startswith("direct"):
        use_ring_attention(model)
    run = model
    if mode == "backend":
        run = torch.compile(model, backend="dilated", options={"policy": policy})
    elif mode == "direct-compiled":
        run = torch.compile(model)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    losses, first_logits = [], None
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        logits = run(local_idx, pos)
        first_logits = logits.detach() if first_logits is None else first_logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), local_labels.flatten(), reduction="sum") / n_tokens
        loss.backward()
        total = loss.detach().clone()
        if world > 1:
            for p in model.parameters():
                dist.all_reduce(p.grad)
            dist.all_reduce(total)
        opt.step()
        losses.append(total.item())
    return losses, first_logits


def check_logits(local_logits: torch.Tensor, reference: PositionedGPT, idx) -> bool:
    """This rank's logits against the single-process model's on the full sequence, restricted."""
    with torch.no_grad():
        full = reference(idx, torch.arange(idx.shape[1], device=idx.device))
    expected = shard(full, 1, LAYOUT)
    err = (local_logits - expected).abs().max().item()
    tol = 1e-4 * expected.abs().max().item()
    rank = dist.get_rank() if dist.is_initialized() else 0
    print(f"rank {rank}: first-step logits, max |ring - single process| = {err:.3e} (tolerance {tol:.3e})")
    return err <= tol


def train_single(
    model: PositionedGPT, idx, labels, steps: int, lr: float = 1e-3, policy=None
) -> list[float]:
    """The same training on the full sequence in one process: ordinary attention, or what
    `policy` (without `ring:`) makes of it under the dilated backend."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    pos = torch.arange(idx.shape[1], device=idx.device)
    run = model if policy is None else torch.compile(model, backend="dilated", options={"policy": policy})
    losses = []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(run(idx, pos).float().flatten(0, 1), labels.flatten())
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def compare(ring: list[float], single: list[float], rtol: float) -> bool:
    """Print both loss curves; True when every step agrees within rtol."""
    ok = True
    for step, (a, b) in enumerate(zip(ring, single)):
        good = abs(a - b) <= rtol * abs(b)
        ok &= good
        print(f"step {step}: ring {a:.6f}  single process {b:.6f}  {'OK' if good else 'MISMATCH'}")
    return ok


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("backend", "direct", "direct-compiled"), default="backend")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=2)
    args = parser.parse_args(argv)

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=120))
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dtype = torch.float32
    model_kwargs = dict(n_layer=2, n_head=4, n_embd=64, vocab=256, block_size=max(args.seq_len, 256))
    if args.seq_len % (2 * world):
        parser.error(f"--seq-len must be a multiple of 2 * world size = {2 * world} (zigzag layout)")

    idx, labels = make_batch(args.batch, args.seq_len, model_kwargs["vocab"], device)
    model = build(model_kwargs, device, dtype)
    reference = copy.deepcopy(model)
    ring_losses, first_logits = train_ring(model, idx, labels, args.steps, args.mode)

    ok = check_logits(first_logits, reference, idx)
    if rank == 0:
        if args.mode == "backend":
            for report in dilated_compile.reports():
                print(report)
            counts = torch._dynamo.utils.counters["dilated"]
            print(f"sites rewritten: {counts['rewritten']}, left: {counts['left']}")
        single_losses = train_single(reference, idx, labels, args.steps)
        ok &= compare(ring_losses, single_losses, rtol=1e-5)
    flag = torch.tensor([int(ok)], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    if rank == 0:
        print(f"{world} ranks, mode {args.mode}: {'training matches' if flag.item() else 'MISMATCH'}")
    dist.destroy_process_group()
    return 0 if flag.item() else 1


if __name__ == "__main__":
    sys.exit(main())
