"""Replay one rank's logged Inductor forward (CUDA output code) outside the ring.

The Triton miscompile of docs/limitations.md (block-sparse local_window ring,
contiguous layout, through Inductor on CUDA): `rank1_forward.txt` is rank 1's
forward module as `TORCH_LOGS=output_code` printed it on 2 H200s (torch 2.11,
`tests/ring_worker.py --backend nccl --only
backend-block-sparse-local-contiguous-causal`, B=2, H=3, 8 positions per
rank, head dim 64). This script turns its `call` into a plain function (the
all-to-all replaced by rank 0's stacked keys and values, given), runs it, and
compares rank 1's output with the float64 block-sparse reference.

    TRITON_INTERPRET=1 python tests/replay/replay.py --save cpu.pt   # CPU, Triton's interpreter
    python tests/replay/replay.py --device cuda --save gpu.pt        # the kernels compiled for the GPU
    python tests/replay/replay.py --diff cpu.pt gpu.pt               # first kernel whose outputs differ

Each Triton kernel launch and each bmm is recorded in call order.

On the CPU (interpreter; `libdevice` calls mapped to `tl` ones) the replay
gives the right output (max error 6.4e-7 at every XBLOCK from 1 to 1024), so
the logged code itself is right; run it on a GPU to see whether the compiled
kernels or the cuBLAS calls are what goes wrong there.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", ".."))

B, H, N_LOCAL, D, BLOCK, WINDOW = 2, 3, 8, 64, 3, 1


def module_source(log: str, interpret: bool) -> str:
    """Python source of the kernels and a `call(args, received, record)` from the logged module."""
    text = open(log).read()
    lines = text.splitlines()
    out = [
        "import torch, triton, triton.language as tl",
        "from torch._inductor.runtime import triton_helpers",
        "from torch._inductor.runtime.triton_helpers import libdevice, math as tl_math",
        "reinterpret_tensor = torch._C._dynamo.guards._reinterpret_tensor",
        "DEVICE = None",
        "def empty_strided_cuda(size, stride, dtype):",
        "    t = torch.empty_strided(size, stride, dtype=dtype, device=DEVICE)",
        "    return t.fill_(float('nan')) if dtype.is_floating_point else t",
        "class _K:",
        "    def __init__(self, name, fn, reduction):",
        "        self.name, self.fn, self.reduction = name, fn, reduction",
        "    def run(self, *args, stream=None):",
        "        xnumel = args[-2] if self.reduction else args[-1]",
        "        xb = 1 << max(0, (xnumel - 1).bit_length())",
        "        extra = {}",
        "        if self.reduction and REDUCTION_CONFIG:  # forced: XBLOCK and num_warps",
        "            xb, extra['num_warps'] = REDUCTION_CONFIG",
        "        self.fn[(-(-xnumel // xb),)](*args, XBLOCK=xb, **extra)",
        "        RECORD.append((self.name, [a.detach().cpu().clone() for a in args if isinstance(a, torch.Tensor)]))",
        "RECORD = []",
        "REDUCTION_CONFIG = None",
        "def _bmm(a, b, out):",
        "    torch.bmm(a, b, out=out)",
        "    RECORD.append(('bmm', [a.detach().cpu().clone(), b.detach().cpu().clone(), out.detach().cpu().clone()]))",
    ]
    pattern = r"^(\w+) = async_compile\.triton\('\w+', '''\n(.*?)''', device_str='cuda'\)"
    for m in re.finditer(pattern, text, re.S | re.M):
        name, body = m.group(1), m.group(2)
        skip = False
        for line in body.splitlines():
            if line.startswith("@triton_heuristics"):
                skip = True
            if line.startswith("@triton.jit"):
                skip = False
            if skip or line.startswith(("import ", "from ", "triton_helpers.set_driver")):
                continue
            out.append(line)
        out.append(f"{name} = _K({name!r}, {name}, {name.startswith(('triton_per', 'triton_red'))})")
    start = next(i for i, line in enumerate(lines) if line.strip() == "def call(self, args):")
    out.append("def call(args, received):")
    for line in lines[start + 1 :]:
        if any(s in line for s in ("assert_size_stride", "assert_alignment", "get_raw_stream", "set_device")):
            continue
        line = line.replace("with torch.cuda._DeviceGuard(1):", "if True:")
        line = line.replace("stream=stream1", "stream=None")
        line = re.sub(r"torch\.ops\._c10d_functional\.all_to_all_single\.default\(.*\)$", "received.clone()", line)
        line = line.replace("torch.ops._c10d_functional.wait_tensor.default(", "(lambda t: t)(")
        line = line.replace("extern_kernels.bmm(", "_bmm(")
        out.append(line)
        if line.strip().startswith("return ("):
            break
    src = "\n".join(out) + "\n"
    if interpret:  # torch's libdevice wrappers do not run in Triton's interpreter
        src = re.sub(r"libdevice\.isinf\((\w+)\)\.to\(tl\.int1\)", r'(tl.abs(\1) == float("inf"))', src)
        src = src.replace("libdevice.exp(", "tl.exp(").replace("tl_math.log(", "tl.log(")
        src = src.replace("tl_math.abs(", "tl.abs(")
    return src


def inputs_and_reference() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The full q, k, v (CPU, float32, 2 ranks' worth) and the float64 block-sparse reference."""
    from dilated_compile.lowering.reference import block_sparse_reference

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, 2 * N_LOCAL, D, generator=g) for _ in range(3))
    pattern = {"kind": "local_window", "window": WINDOW}
    ref = block_sparse_reference(q.double(), k.double(), v.double(), block_size=BLOCK, pattern=pattern, is_causal=True)
    return q, k, v, ref


def run(device: str, save: str | None, reduction_config: tuple[int, int] | None = None) -> None:
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    path = os.path.join(HERE, "_generated_replay.py")
    with open(path, "w") as f:
        f.write(module_source(os.path.join(HERE, "rank1_forward.txt"), interpret))
    sys.path.insert(0, HERE)
    import _generated_replay as mod

    mod.DEVICE = torch.device(device)
    mod.REDUCTION_CONFIG = reduction_config
    q, k, v, ref = inputs_and_reference()

    def shard(t: torch.Tensor, rank: int) -> torch.Tensor:
        return t[:, :, rank * N_LOCAL : (rank + 1) * N_LOCAL].contiguous().to(device)

    received = torch.stack([shard(k, 0), shard(v, 0)]).reshape(-1).contiguous()
    out = mod.call([shard(q, 1), shard(k, 1), shard(v, 1)], received)[0]
    err = (out.double().cpu() - ref[:, :, N_LOCAL:]).abs()
    print(f"{device} ({'interpreter' if interpret else 'compiled'}): max error {err.max().item():.3g}, "
          f"per row {[round(x, 4) for x in err.amax(dim=(0, 1, 3)).tolist()]}")
    if save:
        torch.save(mod.RECORD, save)


def diff(a: str, b: str) -> None:
    """Per recorded call (Triton kernel or bmm, in call order): the largest difference of its buffers."""
    ra, rb = torch.load(a), torch.load(b)
    if [n for n, _ in ra] != [n for n, _ in rb]:
        print(f"the two records differ in their calls:\n  {[n for n, _ in ra]}\n  {[n for n, _ in rb]}")
    for (name, xs), (other, ys) in zip(ra, rb):
        if name != other or [x.shape for x in xs] != [y.shape for y in ys]:
            print(f"{'-':>10}  {name} / {other}: different calls, not compared")
            continue
        worst = max(((x.double() - y.double()).abs().nan_to_num(1e30).max().item() if x.numel() else 0.0)
                    for x, y in zip(xs, ys))
        print(f"{worst:10.3g}  {name}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--save")
    p.add_argument("--diff", nargs=2)
    p.add_argument(
        "--reduction-config", type=int, nargs=2, metavar=("XBLOCK", "NUM_WARPS"),
        help="launch the reduction kernels with this XBLOCK and num_warps (in_process.py saw "
        "the wrong output with XBLOCK 8, num_warps 2 and the right one with XBLOCK 1)",
    )
    args = p.parse_args()

    if args.diff:
        diff(*args.diff)
    else:
        run(args.device, args.save, tuple(args.reduction_config) if args.reduction_config else None)


if __name__ == "__main__":
    main()
