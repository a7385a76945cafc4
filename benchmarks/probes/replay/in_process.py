"""Probe: the open block-sparse ring bug, inside the process where it happens.

README "Known limitations": on CUDA (2 H200s, torch 2.11) a block-sparse
`local_window` ring with the `contiguous` layout, compiled through the
backend, gave wrong output on rank 1 in some processes. This probe found the
cause (benchmarks/NOTES.md, eighth session): one persistent reduction that
Triton 3.6 miscompiles at XBLOCK 8 with 2 warps, a config Inductor's
autotuner picks in some processes only (each recorded kernel's config and
binary identity are in the JSON).

This runs that sequence on 2 GPUs, then calls the compiled site 3 times on
the replay probe's inputs (`replay.py`: B=2, H=3, 8 positions per rank, head
dim 64). It prints rank 1's error per row for each call. For the calls named
in --record it also records every Triton kernel's and bmm's buffers and each
kernel's chosen launch config, on rank 1. Recording synchronises after each
launch, so a race would hide in those calls; the unrecorded ones show
whether one exists. Rank 1 then runs the replay on the CPU under Triton's
interpreter (right there) and diffs each recorded call against it, kernel by
kernel, and prints whether what the last kernel wrote is right and whether the
caller got that buffer (a right kernel output and a wrong result would put the
bug in the wrappers around the compiled code).

    torchrun --nproc-per-node 2 benchmarks/probes/replay/in_process.py --out $OUT [--record 1 3] [--alone]

--alone skips the preceding case (the control: expected right).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import torch
import torch.distributed as dist

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.join(HERE, "..", "..", "..")
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

from replay import N_LOCAL, diff, inputs_and_reference  # noqa: E402
from tests import ring_worker  # noqa: E402

BEFORE = "backend-dilated-zigzag-causal"
RECORD: list = []
POINTERS: list = []  # data pointers of each recorded Triton kernel's tensors
CONFIGS: list = []
RECORDING = [False]


def identity(autotuner) -> dict:
    """Which compiled binary a CachingAutotuner runs: its object, source and kernel hashes."""
    import hashlib

    src = getattr(getattr(autotuner, "fn", None), "src", "") or ""
    results = []
    for r in getattr(autotuner, "compile_results", []):
        kernel = getattr(r, "kernel", None)
        ptx = (getattr(kernel, "asm", None) or {}).get("ptx") if kernel is not None else None
        results.append({
            "result": type(r).__name__,
            "kernel": type(kernel).__name__,
            "hash": getattr(kernel, "hash", None),
            "ptx_sha1": hashlib.sha1(ptx.encode()).hexdigest() if isinstance(ptx, str) else None,
        })
    return {
        "id": id(autotuner),
        "src_sha1": hashlib.sha1(src.encode()).hexdigest(),
        "launcher": type(autotuner.launchers[0]).__name__ if autotuner.launchers else None,
        "results": results,
    }


def all_autotuners() -> list:
    """(kernel name, identity) of every Triton kernel of this process."""
    import gc

    from torch._inductor.runtime.triton_heuristics import CachingAutotuner

    found = []
    for o in gc.get_objects():
        try:
            if isinstance(o, CachingAutotuner):
                found.append((o.inductor_meta.get("kernel_name", "?"), identity(o)))
        except ReferenceError:  # a dead weak proxy
            continue
    return sorted(found, key=lambda t: t[0])


def install_recorders() -> None:
    """Record every Triton kernel launch and `extern_kernels.bmm` while RECORDING[0] is set."""
    from torch._inductor.runtime.triton_heuristics import CachingAutotuner
    from torch._inductor.select_algorithm import extern_kernels

    run = CachingAutotuner.run

    def recorded_run(self, *args, **kwargs):
        result = run(self, *args, **kwargs)
        if RECORDING[0]:
            name = self.inductor_meta.get("kernel_name", "?")
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            RECORD.append((name, [a.detach().cpu().clone() for a in tensors]))
            POINTERS.append((name, [a.data_ptr() for a in tensors]))
            config = self.launchers[0].config if len(self.launchers) == 1 else None
            CONFIGS.append((name, str(config), identity(self)))
        return result

    CachingAutotuner.run = recorded_run
    bmm = extern_kernels.bmm

    def recorded_bmm(a, b, out):
        result = bmm(a, b, out=out)
        if RECORDING[0]:
            RECORD.append(("bmm", [t.detach().cpu().clone() for t in (a, b, out)]))
        return result

    extern_kernels.bmm = recorded_bmm


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--record", type=int, nargs="*", default=[1, 3], help="calls (1..3) to record on rank 1")
    p.add_argument("--alone", action="store_true", help=f"skip {BEFORE} (the control)")
    args = p.parse_args()
    rank = int(os.environ["RANK"])
    backend = "nccl" if torch.cuda.is_available() else "gloo"  # gloo: a CPU run of the probe itself
    ring_worker.configure(backend, rank)
    dist.init_process_group(backend)
    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    if not args.alone:
        ring_worker.cases(2, backend)[BEFORE]()
    install_recorders()
    torch._dynamo.reset()
    model = torch.compile(
        ring_worker._SDPA(True), backend="dilated",
        options={"policy": ring_worker._ring_policy("block_sparse", "contiguous", "local")},
    )
    q, k, v, ref = inputs_and_reference()
    rows = slice(rank * N_LOCAL, (rank + 1) * N_LOCAL)
    want = ref[:, :, rows]
    summary = {"alone": args.alone, "calls": []}
    for call in (1, 2, 3):
        local = [t[:, :, rows].contiguous().to(device).requires_grad_() for t in (q, k, v)]
        RECORD.clear()
        POINTERS.clear()
        CONFIGS.clear()
        RECORDING[0] = rank == 1 and call in args.record
        out = model(*local)
        if device.type == "cuda":
            torch.cuda.synchronize()
        RECORDING[0] = False
        err = (out.detach().double().cpu() - want).abs().amax(dim=(0, 1, 3))
        if POINTERS:  # what the compiled code wrote last, against what the caller got
            name, pointers = POINTERS[-1]
            written = next(ts[0] for n, ts in reversed(RECORD) if n == name)
            wrong = ((written.double().reshape(want.shape) - want).abs().max().item()
                     if written.numel() == want.numel() else float("nan"))
            print(f"rank {rank} call {call}: last kernel {name[:60]}... wrote {tuple(written.shape)} at "
                  f"{pointers[0]:#x}; the caller got {tuple(out.shape)} stride {out.stride()} offset "
                  f"{out.storage_offset()} at {out.data_ptr():#x}; error of what the kernel wrote "
                  f"{wrong:.3g}", flush=True)
        if err.max().item() > 1e-3:  # is the caller's tensor one of the inputs, or another buffer?
            same = {name: (out.detach() - t.detach()).abs().max().item() for name, t in zip("qkv", local)}
            print(f"rank {rank} call {call}: wrong; out at {out.data_ptr():#x}, inputs at "
                  f"{[hex(t.data_ptr()) for t in local]}; max |out - input| {same}", flush=True)
        out.backward(torch.ones_like(out))  # its collectives need every rank
        print(f"rank {rank} call {call}: max error {err.max().item():.3g}, per row "
              f"{[round(x, 3) for x in err.tolist()]}", flush=True)
        summary["calls"].append({"call": call, "max_error": err.max().item(), "recorded": bool(RECORD)})
        if RECORD:
            torch.save(list(RECORD), os.path.join(args.out, f"rank1_call{call}.pt"))
            summary[f"configs_call{call}"] = list(CONFIGS)
    dist.barrier()
    if rank == 1:
        cpu = os.path.join(args.out, "cpu.pt")
        env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
        subprocess.run([sys.executable, os.path.join(HERE, "replay.py"), "--save", cpu], env=env, check=True)
        for call in args.record:
            print(f"--- call {call} against the CPU replay (largest difference per recorded call)", flush=True)
            diff(cpu, os.path.join(args.out, f"rank1_call{call}.pt"))
        summary["autotuners"] = all_autotuners()
        names = [n for n, _ in summary["autotuners"]]
        print("kernel names compiled more than once in this process:",
              sorted({n for n in names if names.count(n) > 1}), flush=True)
        with open(os.path.join(args.out, "in_process.json"), "w") as f:
            json.dump(summary, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
