"""Train an HF causal LM with FSDP2 x ring attention on a 2-D device mesh, with checkpoint and resume.

    torchrun --nproc-per-node 4 examples/train_fsdp_ring.py                # 2 x 2 mesh (dp x cp)
    torchrun --nproc-per-node 4 examples/train_fsdp_ring.py --resume       # continue from the checkpoint
    torchrun --nproc-per-node 4 examples/train_fsdp_ring.py --cp 4         # the sequence over 4 ranks
    torchrun --nproc-per-node 4 examples/train_fsdp_ring.py --model llama --inner dilated

The ranks form a ``(dp, cp)`` DeviceMesh. The sequence of every batch row is
cut over ``cp`` (zigzag layout) and attention becomes ring attention over
``mesh["cp"]`` through a policy; FSDP2 shards parameters and averages
gradients over dp and cp together (every rank of both holds different
tokens); every decoder layer is activation-checkpointed; the model is
compiled whole with ``backend="dilated"``. Each step's batch is cut with
`dilated_compile.shard_causal_lm_batch` and its loss reduced with
`dilated_compile.causal_lm_loss` (the printed loss is the global mean, equal
on every rank). Model and optimizer are saved with torch.distributed.checkpoint
(DCP) at the end; ``--resume`` loads them and trains the next steps. CPU
(gloo) by default, GPUs (NCCL) when CUDA is available. The data are random
tokens drawn from a seed per step, so a resumed run sees the batches the
uninterrupted run would have.

The model is built from its config. By default a small Qwen2 whose layers
alternate a sliding window (``--window`` tokens, as Mistral's layers) and
full causal attention; its attention builds each layer's mask inside the
layer (`dilated_compile.register_layer_mask_attention`), where the backend
proves the window. The policy's rule makes every layer's attention a ring
with dense inner attention: on the sliding-window layers the window is kept
and only keys within it cross ranks, on the full layers it is causal.
``--model llama`` trains a Llama (causal layers only), which also takes
``--inner dilated``.
"""

from __future__ import annotations

import argparse
import os
import warnings

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import dilated_compile
from dilated_compile import causal_lm_loss, shard_causal_lm_batch

LAYOUT = "zigzag"


def policy(inner: str) -> dict:
    """Every decoder layer's attention becomes a ring over the registered group "cp" (a sliding-
    window layer's in its window)."""
    rule = {"match": "model.layers.*.self_attn", "attention": inner, "ring": {"group": "cp", "layout": LAYOUT}}
    if inner == "dilated":
        rule.update(segment_lengths=[64, 256], dilation_rates=[1, 4], head_split="longnet")
    return {"version": 1, "strict": True, "rules": [rule]}


def build_model(args, device: torch.device):
    import transformers

    common = dict(num_hidden_layers=args.layers, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                  num_attention_heads=args.heads, num_key_value_heads=max(1, args.heads // 2),
                  vocab_size=args.vocab, max_position_embeddings=max(args.seq_len, 256))
    if args.model == "llama":
        cfg = transformers.LlamaConfig(**common, attn_implementation="sdpa")
        cls = transformers.LlamaForCausalLM
    else:  # sliding-window and full-attention layers, alternating
        kinds = ["sliding_attention", "full_attention"] * args.layers
        cfg = transformers.Qwen2Config(**common, use_sliding_window=True, sliding_window=args.window,
                                       max_window_layers=0, layer_types=kinds[: args.layers],
                                       attn_implementation=dilated_compile.register_layer_mask_attention())
        cls = transformers.Qwen2ForCausalLM
    torch.manual_seed(0)  # the same initial weights on every rank
    return cfg, cls(cfg).to(device)


def parallelize(model, mesh, fsdp_mesh, inner: str):
    """Activation checkpointing, FSDP2 over dp x cp, the ring group, and the compiled model."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers 5
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    for layer in model.model.layers:
        fully_shard(layer, mesh=fsdp_mesh)
    fully_shard(model, mesh=fsdp_mesh)
    dilated_compile.register_group("cp", mesh["cp"])
    return torch.compile(model, backend="dilated", options={"policy": policy(inner)})


def empty_cache_kwargs(model, cfg) -> dict:
    """``use_cache=False`` and a new, empty DynamicCache, under the keyword the model's forward
    takes (``cache`` in newer transformers, ``past_key_values`` in older ones; `model` may be
    the compiled one)."""
    import inspect

    import transformers

    forward = getattr(model, "_orig_mod", model).forward
    name = "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"
    return {"use_cache": False, name: transformers.DynamicCache(config=cfg)}


def batch_of_step(step: int, args, dp: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch of `step` (every row, whole sequences): the same on every rank."""
    g = torch.Generator().manual_seed(1000 + step)
    ids = torch.randint(0, args.vocab, (dp * args.batch, args.seq_len), generator=g)
    return ids.to(device), ids.to(device)  # labels = ids, unshifted (as for an HF model)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cp", type=int, default=2, help="context-parallel ranks (the ring); dp = world / cp")
    parser.add_argument("--model", choices=("qwen2-mixed", "llama"), default="qwen2-mixed",
                        help="qwen2-mixed: sliding-window and full-attention layers; llama: causal layers")
    parser.add_argument("--window", type=int, default=32,
                        help="sliding window of qwen2-mixed's window layers; smaller than a rank's shard")
    parser.add_argument("--inner", choices=("dense", "dilated"), default="dense",
                        help="inner attention of the ring (dilated: --model llama only)")
    parser.add_argument("--steps", type=int, default=3, help="steps to train in this run")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=2, help="rows per data-parallel rank")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=1000)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--ckpt", default="fsdp_ring_checkpoint", help="DCP checkpoint directory")
    parser.add_argument("--resume", action="store_true", help="load --ckpt first and continue")
    args = parser.parse_args(argv)

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    world, rank = dist.get_world_size(), dist.get_rank()
    if world % args.cp:
        raise SystemExit(f"--cp {args.cp} does not divide the {world} ranks")
    if args.model != "llama" and args.inner == "dilated":
        raise SystemExit("--inner dilated needs --model llama: dilated attention does not keep a sliding "
                         "window, and a ring rule on a site it cannot rewrite is an error")
    if args.model != "llama" and args.window >= args.seq_len // args.cp:
        raise SystemExit(f"--window {args.window} must be smaller than a rank's shard "
                         f"({args.seq_len // args.cp} tokens): the window is read from the shard's mask")
    dp = world // args.cp
    mesh = init_device_mesh(device.type, (dp, args.cp), mesh_dim_names=("dp", "cp"))
    # FSDP2 over dp and cp together: a cp rank computes gradients from its own tokens, so they
    # must be summed over cp as well as over dp, and parameters may be sharded over all ranks
    fsdp_mesh = mesh["dp", "cp"]._flatten("dp_cp")

    cfg, model = build_model(args, device)
    compiled = parallelize(model, mesh, fsdp_mesh, args.inner)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)

    first = 0
    if args.resume:
        model_state, optim_state = get_state_dict(model, opt)
        state = {"model": model_state, "optim": optim_state, "step": 0}
        dcp.load(state, checkpoint_id=args.ckpt)
        set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
        first = int(state["step"])
        if rank == 0:
            print(f"resumed from {args.ckpt} after step {first}", flush=True)

    dp_rank = mesh.get_local_rank("dp")
    for step in range(first, first + args.steps):
        ids, labels = batch_of_step(step, args, dp, device)
        rows = slice(dp_rank * args.batch, (dp_rank + 1) * args.batch)
        batch = shard_causal_lm_batch(ids[rows], labels[rows], layout=LAYOUT, group=mesh["cp"])
        # position_ids: the shard's global positions; no labels= (an HF model would shift them
        # inside the shard). An empty cache keeps HF from reading the shard's non-consecutive
        # positions as packed sequences (an explicit mask, which a ring cannot run)
        logits = compiled(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                          **empty_cache_kwargs(model, cfg)).logits
        loss = causal_lm_loss(logits, batch["labels"], group=fsdp_mesh)
        loss.backward()
        opt.step()
        opt.zero_grad()
        if rank == 0:
            if step == first:  # what each layer's attention became
                for site in (s for report in dilated_compile.reports() for s in report.sites):
                    print(f"  {site.module}: {site.attention or site.reason}", flush=True)
            print(f"step {step + 1}: loss {loss.item():.6f}", flush=True)

    model_state, optim_state = get_state_dict(model, opt)
    state = {"model": model_state, "optim": optim_state, "step": first + args.steps}
    with warnings.catch_warnings():  # torch warns on replacing a checkpoint even when asked to
        warnings.filterwarnings("ignore", message="Detected an existing checkpoint")
        dcp.save(state, storage_writer=dcp.FileSystemWriter(args.ckpt, overwrite=True))
    if rank == 0:
        print(f"saved {args.ckpt} after step {first + args.steps} ({dp} x {args.cp} mesh, "
              f"{'nccl' if cuda else 'gloo'}, {args.model}, inner {args.inner})", flush=True)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
