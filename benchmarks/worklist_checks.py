"""Correctness of the work-list dilated attention on one GPU, for `bench_worklist.py`:
each max error of the forward and the gradients against the float64 reference
at small shapes, next to the tolerance rule's budget."""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from dilated_compile import dilated_attention, dilated_reference

CHECKS = [
    # B, H, N, D, segments, rates
    (2, 5, 300, 64, (64, 128, 256), (1, 2, 4)),
    (1, 16, 512, 128, (128, 256, 512), (1, 6, 12)),
    (2, 3, 77, 128, (16, 1024), (2, 16)),
    (1, 7, 1000, 128, (96, 200, 384), (1, 3, 5)),
    (1, 2, 2100, 64, (1024, 2048), (1, 2)),
]


class settings:
    """``with settings(DILATED_WORKLIST="on", ...):`` sets environment variables
    (restored after); ``settings("on")`` is ``DILATED_WORKLIST=on``."""

    def __init__(self, worklist: str | None = None, **env: str):
        self.env = {**({"DILATED_WORKLIST": worklist} if worklist else {}), **env}

    def __enter__(self):
        self.before = {name: os.environ.get(name) for name in self.env}
        os.environ.update(self.env)

    def __exit__(self, *exc):
        for name, value in self.before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


GRAD_TOL = {torch.float16: 2e-2, torch.bfloat16: 6e-2}  # of max |reference gradient|, as tests/test_gpu.py


def _errors(dtype, b, h, n, d, seg, rates, split, causal, modes) -> dict:
    g = torch.Generator(device="cuda").manual_seed(n + h)
    base = [torch.randn(b, n, h, d, device="cuda", dtype=dtype, generator=g).transpose(1, 2) for _ in range(3)]
    grad = torch.randn(b, h, n, d, device="cuda", dtype=dtype, generator=g)
    ref_in = [t.detach().double().requires_grad_() for t in base]  # float64 on the GPU
    ref = dilated_reference(*ref_in, seg, rates, head_split=split, is_causal=causal)
    ref.backward(grad.double())
    dense = F.scaled_dot_product_attention(*base, is_causal=causal).double()
    dense_ref = dilated_reference(*[t.double() for t in base], (n,), (1,), is_causal=causal)
    res = {"dense_sdpa_err": (dense - dense_ref).abs().max().item()}
    res["budget"] = 2 * res["dense_sdpa_err"] + 8 * torch.finfo(dtype).eps * ref.abs().max().item()
    res["grad_scale"] = max(max(r.grad.abs().max().item() for r in ref_in), 1.0)
    for mode in modes:
        with settings(mode):
            xs = [t.detach().clone().requires_grad_() for t in base]
            out = dilated_attention(*xs, seg, rates, head_split=split, is_causal=causal)
            out.backward(grad)
        tag = "worklist" if mode == "on" else "blocks"
        res[f"{tag}_out_err"] = (out.double() - ref.detach()).abs().max().item()
        for name, x, r in zip(("dq", "dk", "dv"), xs, ref_in):
            res[f"{tag}_{name}_err"] = (x.grad.double() - r.grad).abs().max().item()
    return res


def check(args) -> list[dict]:
    rows = []
    for dtype in (torch.bfloat16, torch.float16):
        for b, h, n, d, seg, rates in CHECKS if dtype == torch.bfloat16 else CHECKS[:2]:
            for split in ("groups", "longnet"):
                for causal in (False, True):
                    r = dict(dtype=str(dtype), B=b, H=h, N=n, D=d, seg=seg, rates=rates, split=split, causal=causal)
                    modes = ("on", "off") if args.compare_blocks else ("on",)
                    r.update(_errors(dtype, b, h, n, d, seg, rates, split, causal, modes))
                    worst = max(r["worklist_dq_err"], r["worklist_dk_err"], r["worklist_dv_err"])
                    r["ok"] = r["worklist_out_err"] <= r["budget"] and worst <= GRAD_TOL[dtype] * r["grad_scale"]
                    blocks = ""
                    if args.compare_blocks:
                        old = max(r["blocks_dq_err"], r["blocks_dk_err"], r["blocks_dv_err"])
                        blocks = f" (gathered blocks: out {r['blocks_out_err']:.2e}, grads {old:.2e})"
                    print(
                        f"check {str(dtype)[6:]:8} B{b} H{h:<2} N{n:<5} D{d:<3} {split:7} causal={causal!s:5} "
                        f"out {r['worklist_out_err']:.2e} (budget {r['budget']:.2e}) grads {worst:.2e} "
                        f"(allowed {GRAD_TOL[dtype] * r['grad_scale']:.2e}){blocks} {'ok' if r['ok'] else 'FAIL'}",
                        flush=True,
                    )
                    rows.append(r)
    return rows
