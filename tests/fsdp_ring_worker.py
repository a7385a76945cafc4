"""One rank of a multi-process FSDP2 x ring training run (gloo on CPU).

    python -m tests.fsdp_ring_worker --rank R --world W --dp D [D ...] --store FILE --out DIR
                                     --ckpt DIR --phase train|resume [--only NAME ...]

For each D the ranks form a ``(dp, cp)`` DeviceMesh (cp = W / dp), one process
group holding them all, and run that mesh's cases, named ``dp<D>-cp<C>-<case>``
(``cp<W>-<case>`` when D is 1). Each case builds a
tiny HF causal LM from its config (`MODELS` in `tests/fsdp_ring_models.py`),
wraps it as people train long context: activation checkpointing, FSDP2
(``fully_shard``) over the flattened dp x cp mesh, ``torch.compile(...,
backend="dilated")`` with a ring rule on ``mesh["cp"]``, AdamW; feeds it
batches cut by `dilated_compile.shard_causal_lm_batch` and reduces the loss
with `dilated_compile.causal_lm_loss`. It trains `STEPS` steps and checks
the losses and the updated parameters against single-process training of
the same global batch with float64 reference attention, run on each rank.

Phase ``train`` saves a DCP checkpoint of model and optimizer after step
`CHECKPOINT_AFTER` and records the last step's loss and parameters; phase
``resume`` (new processes) builds the model again, loads the checkpoint and
checks that the last step gives exactly that loss and those parameters.

Results go to ``DIR/rank<R>.json`` as in `tests/ring_worker.py`:
``{"results": {case: null | "failure text"}, "current": case, "seconds": {case: s}}``.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import functools
import os
import sys
import time
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

from torch._dynamo.utils import counters

import dilated_compile
from dilated_compile import causal_lm_loss, shard_causal_lm_batch

from .fsdp_ring_models import (
    BATCH_PER_DP, DILATED, LR, MODELS, SEQ_LEN, VOCAB, WINDOW, layer_kinds, train_reference,
)
from examples.train_fsdp_ring import empty_cache_kwargs
from .launcher import RankResults

STEPS, CHECKPOINT_AFTER = 3, 2
LAYOUT = "zigzag"
# float32 against float64 attention. Loss: relative; gradients: relative to a tensor's largest
# |value|. AdamW's first steps move every weight by about LR whatever the size of its gradient
# (m / sqrt(v)), so rounding in a gradient near zero moves a weight by a sizeable part of LR:
# parameters get a bound in units of LR (a missed or doubled update is off by LR), and the
# gradients of later steps, at weights that differ that much, a looser bound than the first's
TOL = {"loss": 1e-5, "grads": 1e-4, "later grads": 2e-3, "params": 0.05 * LR}
SITES = "model.layers.*.self_attn"

MESH = None  # set by main: the (dp, cp) DeviceMesh
FSDP_MESH = None  # set by main: its dp and cp dimensions flattened into one
CKPT_DIR = ""  # set by main: where phase "train" saves checkpoints and phase "resume" loads them


class CaseFailure(AssertionError):
    """A check of a case failed on this rank."""


# ---------------------------------------------------------------------------
# FSDP2 x ring


def global_batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, labels) of the whole global batch, the same on every rank; labels unshifted, some
    ignored (a different number in each row, so the ranks' token counts differ)."""
    dp = MESH.size(0)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (dp * BATCH_PER_DP, SEQ_LEN), generator=g)
    labels = ids.clone()
    for row in range(labels.shape[0]):
        labels[row, 3 + 5 * row : 3 + 5 * row + 4 * (row + 1)] = -100
    return ids, labels


def ring_policy(inner: str, strict: bool = True) -> dict:
    rule = {"match": SITES, "attention": inner, "ring": {"group": "cp", "layout": LAYOUT}}
    if inner == "dilated":
        rule.update(DILATED)
    return {"version": 1, "strict": strict, "rules": [rule]}


def enable_checkpointing(model) -> None:
    """HF activation checkpointing of every decoder layer (non-reentrant)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def parallelize(model, inner: str, strict: bool = True):
    """Activation checkpointing, FSDP2 over dp x cp and the compiled model, as a user writes it."""
    from torch.distributed.fsdp import fully_shard

    dilated_compile.register_group("cp", MESH["cp"])
    enable_checkpointing(model)
    for layer in model.model.layers:
        fully_shard(layer, mesh=FSDP_MESH)
    fully_shard(model, mesh=FSDP_MESH)
    return torch.compile(model, backend="dilated", options={"policy": ring_policy(inner, strict)})


def local_batch(ids: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """This rank's rows (dp) and sequence shard (cp) of the global batch."""
    dp_rank = MESH.get_local_rank("dp")
    rows = slice(dp_rank * BATCH_PER_DP, (dp_rank + 1) * BATCH_PER_DP)
    return shard_causal_lm_batch(ids[rows], labels[rows], layout=LAYOUT, group=MESH["cp"])


def train_step(compiled, cfg, opt, batch: dict[str, torch.Tensor]) -> dict:
    """One step: the global mean loss (equal on every rank), gradients and parameters, gathered."""
    # an empty cache keeps HF from reading the (sharded, non-consecutive) positions as packed
    # sequences, so its attention stays is_causal SDPA; activation checkpointing drops the cache
    logits = compiled(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                      **empty_cache_kwargs(compiled, cfg)).logits
    loss = causal_lm_loss(logits, batch["labels"], group=FSDP_MESH)
    loss.backward()
    model = compiled._orig_mod
    grads = {n: p.grad.full_tensor().clone() for n, p in model.named_parameters()}
    opt.step()
    opt.zero_grad()
    return {"loss": loss.item(), "grads": grads, "params": full_params(model)}


def full_params(model) -> dict[str, torch.Tensor]:
    """Every parameter gathered from its shards (a collective: all ranks call it)."""
    return {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()}


def _largest_error(got: dict, want: dict, relative: bool) -> tuple[float, str]:
    """Largest |got - want| over the tensors (over each tensor's largest |want| if `relative`)."""
    errs = {}
    for name, t in got.items():
        err = (t.double() - want[name].double()).abs().max().item()
        errs[name] = err / max(want[name].abs().max().item(), 1e-12) if relative else err
    name = max(errs, key=errs.get)
    return errs[name], name


def _compare(step: int, got: dict, want: dict) -> None:
    """Loss, gradients and updated parameters of a step against single-process training."""
    if abs(got["loss"] - want["loss"]) > TOL["loss"] * abs(want["loss"]):
        raise CaseFailure(f"step {step}: loss {got['loss']!r} != single-process {want['loss']!r}")
    for what in ("grads", "params"):
        err, name = _largest_error(got[what], want[what], relative=what == "grads")
        allowed = TOL[what] if step == 0 or what != "grads" else TOL["later grads"]
        _say(f"step {step} {what}: largest error {err:.3g} ({name})")
        if err > allowed:
            raise CaseFailure(f"step {step}: {what} of {name} differ from single-process by {err:.3g} "
                              f"(allowed {allowed:.3g})")


def _check_sites(cfg, inner: str) -> None:
    """The decoder layers' attention became a ring over cp with `inner` attention, a window
    layer's in its sliding window with only keys within the window exchanged. (FSDP2 makes each
    layer a frame of its own; a layer runs the compiled code of the first layer of its kind.)"""
    sites = {s.module: s for r in dilated_compile.reports() for s in r.sites}
    want = f"ring {LAYOUT} over {MESH.size(1)} ranks (cp), inner {inner}"
    kinds = layer_kinds(cfg)
    wrong = [s for s in sites.values() if s.status != "rewritten" or not s.attention.startswith(want)]
    for kind in set(kinds):
        site = sites.get(f"model.layers.{kinds.index(kind)}.self_attn")
        windowed = site is not None and f"sliding window W={WINDOW}" in site.attention
        if site is None or windowed != (kind == "sliding_attention") or (
                windowed and "within the window, exchanged" not in site.attention):
            wrong.append(site or kind)
    if wrong:
        raise CaseFailure(f"sites: {[(s.module, s.status, s.attention, s.reason) for s in sites.values()]}; "
                          f"want {want!r} at every layer, a sliding window at {kinds}")


def _say(text: str) -> None:
    """Print `text` to the rank's log (the launcher shows logs of failed runs)."""
    print(f"[rank {dist.get_rank()}] {text}", flush=True)


def _case_dir(name: str) -> str:
    return os.path.join(CKPT_DIR, name)


def train_case(family: str, inner: str, name: str) -> None:
    """STEPS steps under FSDP2 x ring == single-process; DCP checkpoint after CHECKPOINT_AFTER."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    torch._dynamo.reset()
    dilated_compile.clear_reports()
    cfg, model = MODELS[family]()
    reference = copy.deepcopy(model)
    compiled = parallelize(model, inner)
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    ids, labels = global_batch()
    batch = local_batch(ids, labels)
    start = time.monotonic()
    want = train_reference(reference, inner, ids, labels, STEPS)
    _say(f"reference: {time.monotonic() - start:.1f} s")
    for step in range(STEPS):
        start = time.monotonic()
        got = train_step(compiled, cfg, opt, batch)
        _say(f"step {step}: {time.monotonic() - start:.1f} s, graphs {dict(counters['stats'])}")
        _compare(step, got, want[step])
        if step + 1 == CHECKPOINT_AFTER:
            model_state, optim_state = get_state_dict(model, opt)
            dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=_case_dir(name))
    _check_sites(cfg, inner)
    if dist.get_rank() == 0:
        torch.save({"loss": got["loss"], "params": got["params"]}, os.path.join(_case_dir(name), "last_step.pt"))
    dist.barrier()


def resume_case(family: str, inner: str, name: str) -> None:
    """New processes: a model built again, loaded from the checkpoint, gives exactly the last step
    of the uninterrupted run."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    torch._dynamo.reset()
    dilated_compile.clear_reports()
    cfg, model = MODELS[family]()
    with torch.no_grad():  # other weights than the run's: everything must come from the checkpoint
        for p in model.parameters():
            p.add_(1.0)
    compiled = parallelize(model, inner)
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    model_state, optim_state = get_state_dict(model, opt)
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=_case_dir(name))
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    ids, labels = global_batch()
    batch = local_batch(ids, labels)
    for _ in range(STEPS - CHECKPOINT_AFTER):
        got = train_step(compiled, cfg, opt, batch)
    loss, params = got["loss"], got["params"]
    want = torch.load(os.path.join(_case_dir(name), "last_step.pt"))
    if loss != want["loss"]:
        raise CaseFailure(f"resumed last step: loss {loss!r} != uninterrupted {want['loss']!r}")
    for pname, p in params.items():
        if not torch.equal(p, want["params"][pname]):
            err = (p - want["params"][pname]).abs().max().item()
            raise CaseFailure(f"resumed last step: parameter {pname} differs from the uninterrupted run by {err:.3g}")
    _check_sites(cfg, inner)


def batch_helper_case() -> None:
    """shard_causal_lm_batch and causal_lm_loss on the mesh, without a model: the shards' labels
    are the whole sequence's shifted ones (a shard's last token predicts the next shard's first),
    positions are global, and the loss is the global mean on every rank with gradients that,
    summed over the ranks and divided by their number (FSDP2's reduction), are the gradients of
    the global mean loss."""
    from dilated_compile.sharding import unshard

    ids, labels = global_batch(seed=1)
    batch = local_batch(ids, labels)
    dp_rank, cp = MESH.get_local_rank("dp"), MESH["cp"].get_group()
    rows = slice(dp_rank * BATCH_PER_DP, (dp_rank + 1) * BATCH_PER_DP)
    shifted = torch.cat([labels[rows, 1:], torch.full((BATCH_PER_DP, 1), -100)], dim=1)
    for name, want in (("labels", shifted), ("input_ids", ids[rows]),
                       ("position_ids", torch.arange(SEQ_LEN).expand(BATCH_PER_DP, SEQ_LEN))):
        got = unshard(batch[name], 1, LAYOUT, cp)
        if not torch.equal(got, want):
            raise CaseFailure(f"{name} of the shards, put together, are not the whole batch's: {got} != {want}")
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(ids.shape[0], SEQ_LEN, VOCAB, generator=g, dtype=torch.float64).requires_grad_()
    want = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
    want.backward()
    local = dilated_compile.shard(logits.detach()[rows], 1, LAYOUT, cp).clone().requires_grad_()
    loss = causal_lm_loss(local, batch["labels"], group=FSDP_MESH)
    loss.backward()
    if abs(loss.item() - want.item()) > 1e-12:
        raise CaseFailure(f"loss {loss.item()!r} != the global mean {want.item()!r}")
    full_grad = torch.zeros_like(logits)  # every rank's gradient at its tokens, summed over ranks
    full_grad[rows, batch["position_ids"][0]] = local.grad
    dist.all_reduce(full_grad)
    full_grad /= dist.get_world_size()
    err = (full_grad - logits.grad).abs().max().item()
    if err > 1e-15:
        raise CaseFailure(f"averaged gradients differ from the global mean loss's by {err:.3g}")


def bad_site_left_case(family: str) -> None:
    """A ring rule targets a site that cannot be rewritten: the model called without the empty
    cache, HF reads the shard's positions as packed sequences and passes an explicit mask.
    Every rank raises (left, the site would attend within the shard); none hangs."""
    torch._dynamo.reset()
    cfg, model = MODELS[family]()
    compiled = parallelize(model, "dense", strict=False)  # an error whatever strict says
    batch = local_batch(*global_batch())
    try:
        compiled(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)
    except Exception as e:  # noqa: BLE001 - the error's type is the backend's, wrapped by Dynamo
        for fragment in ("ring rules target", "within each rank's shard"):
            if fragment not in str(e):
                raise CaseFailure(f"message lacks {fragment!r}: {e}") from e
    else:
        raise CaseFailure("no error for a ring site left as it was")
    dist.barrier()


def window_dilated_left_case(family: str) -> None:
    """A dilated ring rule on a sliding-window site: dilated attention does not keep a window, so
    the site is left with that reason, which under a ring rule is an error on every rank
    (whatever `strict` says); none hangs. Window sites take dense or block_sparse inner attention."""
    torch._dynamo.reset()
    cfg, model = MODELS[family]()
    compiled = parallelize(model, "dilated", strict=False)
    batch = local_batch(*global_batch())
    try:
        compiled(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)
    except Exception as e:  # noqa: BLE001 - the error's type is the backend's, wrapped by Dynamo
        for fragment in ("ring rules target", "model.layers.0.self_attn", f"sliding window (W={WINDOW})",
                         "within each rank's shard"):
            if fragment not in str(e):
                raise CaseFailure(f"message lacks {fragment!r}: {e}") from e
    else:
        raise CaseFailure("no error for a dilated ring rule on a sliding-window site")
    dist.barrier()


# What each mesh (by dp) trains, as (model, inner attention), and resumes: one model compile per
# case is what a launch costs, so each combination runs on one mesh. The Qwen2's full-attention
# layer is a Llama layer (with biases): its dense causal ring stands for the Llama's. Windows take
# dense inner attention (dilated on a window site raises: "window-dilated-left"). FSDP2 shards
# over the flattened dp x cp ranks on both meshes, so their checkpoints are laid out alike: one
# mesh resumes. FSDP_RING_ALL_INNERS=1 in the environment trains and resumes every combination
# on every mesh.
TRAIN = {2: (("qwen2-window", "dense"),), 1: (("llama", "dilated"), ("mistral-window", "dense"))}
RESUME = {2: (("qwen2-window", "dense"),)}
ALL = (("llama", "dense"), ("llama", "dilated"), ("qwen2-window", "dense"), ("mistral-window", "dense"))
# the cases whose ring sites must raise, by mesh
RAISES = {2: ("bad-site-left",), 1: ("window-dilated-left",)}


def cases(world: int, dp: int, phase: str) -> dict[str, Callable[[], None]]:
    """The cases of `phase` for a (dp, world / dp) mesh, by name, in the order every rank runs them."""
    out: dict[str, Callable[[], None]] = {}
    every = bool(os.environ.get("FSDP_RING_ALL_INNERS"))
    if phase == "train":
        out["batch-helper"] = batch_helper_case
    runs = ALL if every else (TRAIN if phase == "train" else RESUME).get(dp, ())
    for family, inner in runs:
        name = f"{family}-{inner}"
        fn = train_case if phase == "train" else resume_case
        out[f"{phase}-{name}"] = functools.partial(fn, family, inner, name)
    if phase == "train":
        raising = {"bad-site-left": functools.partial(bad_site_left_case, "llama"),
                   "window-dilated-left": functools.partial(window_dilated_left_case, "qwen2-window")}
        for name in raising if every else RAISES.get(dp, ()):
            out[name] = raising[name]
    return out


def mesh_name(world: int, dp: int) -> str:
    """'dp2-cp2' for a 2 x 2 mesh, 'cp4' for cp = 4."""
    cp = f"cp{world // dp}"
    return cp if dp == 1 else f"dp{dp}-{cp}"


def main(argv=None) -> int:
    global MESH, FSDP_MESH, CKPT_DIR
    parser = argparse.ArgumentParser()
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--world", type=int, required=True)
    parser.add_argument("--dp", type=int, nargs="+", required=True, help="one mesh per value, in turn")
    parser.add_argument("--store", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--phase", choices=("train", "resume"), required=True)
    parser.add_argument("--only", nargs="*")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{args.store}", rank=args.rank, world_size=args.world,
                            timeout=datetime.timedelta(seconds=120))
    from torch.distributed.device_mesh import init_device_mesh

    results = RankResults(args.out, args.rank)
    for dp in args.dp:
        MESH = init_device_mesh("cpu", (dp, args.world // dp), mesh_dim_names=("dp", "cp"))
        FSDP_MESH = MESH["dp", "cp"]._flatten("dp_cp")  # FSDP2 shards and reduces over dp x cp
        mesh = mesh_name(args.world, dp)
        CKPT_DIR = os.path.join(args.ckpt, mesh)
        for case, fn in cases(args.world, dp, args.phase).items():
            name = f"{mesh}-{case}"
            if not args.only or name in args.only:
                results.run(name, fn)
    results.finish()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
