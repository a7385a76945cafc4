"""Replay: the float32 `longnet` error under Inductor on CUDA, kernel by kernel.

`longnet_fp32_assemble.txt` is the output code Inductor generated on an H200
(torch 2.11, Triton 3.6) for `dilated.assemble` of the float32 `longnet` case
(B=2, H=5, N=300, D=64, segments 64/128/256, rates 1/2/4, causal): compiled,
it returned an output 0.74 away from eager. Under Triton's interpreter on the
CPU the same code is right. This finds the kernel and launch configs that
are wrong on the GPU.

    TRITON_INTERPRET=1 python longnet_fp32.py record REF.pt   # CPU: every kernel's inputs and outputs
    [SWEEP=0] python longnet_fp32.py gpu REF.pt               # CUDA: each kernel on the recorded
                                                              # inputs, per launch config (kernels
                                                              # 2 and 6 also rewritten); then the
                                                              # module as Inductor tunes it
"""
from __future__ import annotations

import importlib.util
import itertools
import os
import re
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", ".."))
CODE = os.path.join(HERE, "longnet_fp32_assemble.txt")
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
SHAPES = [(70, 1, 64), (70, 1, 64, 64), (2, 5, 44, 64), (10, 1, 22, 64), (10, 1, 11, 64),
          (2, 5, 44), (10, 1, 22), (10, 1, 11)]  # the module's arguments, in its order


def plain_math(code: str) -> str:
    """`code` with torch's libdevice wrappers (isinf, exp, log) replaced by tl's own ops."""
    code = re.sub(r"libdevice\.isinf\((\w+)\)", r"(tl.abs(\1) == float('inf'))", code)
    return code.replace("libdevice.exp(", "tl.exp(").replace("tl_math.log(", "tl.log(")


def select_after_load(code: str) -> str:
    """`code` with each masked load's -inf `other` made an explicit select after the load."""
    pattern = r"tl\.load\(([^\n]*?), ([^,\n]*?), eviction_policy='evict_last', other=float\(\"-inf\"\)\)"
    return re.sub(pattern, r"tl.where(\2, tl.load(\1, \2, other=0.0), float('-inf'))", code)


VARIANTS = {
    "original": lambda code: code,
    "plain_math": plain_math,
    "select_after_load": select_after_load,
    "both": lambda code: select_after_load(plain_math(code)),
}


def kernel_function(name: str, code: str, variant: str = "original"):
    """The @triton.jit function of one generated kernel, without Inductor's autotuner."""
    code = re.sub(r"@triton_heuristics\.pointwise\((.|\n)*?\n\)\n@triton\.jit", "@triton.jit", code)
    if INTERPRET:  # torch's libdevice wrappers do not run in the interpreter
        code = code.replace("triton_helpers.set_driver_to_gpu()", "")
        code = plain_math(code)
    code = VARIANTS[variant](code)
    path = os.path.join(HERE, f"_k_{name[-1]}_{variant}.py")
    with open(path, "w") as f:
        f.write(code)
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return getattr(mod, name)


class Recorded:
    """Stands in for a generated kernel: launches it with a fixed config, records its buffers."""

    record: list = []

    def __init__(self, name: str, code: str):
        self.name, self.fn = name, kernel_function(name, code)

    def run(self, *args, stream=None):
        before = [same_strides(a) if isinstance(a, torch.Tensor) else a for a in args]
        launch(self.fn, args, default_config(args))
        self.record.append((self.name, before, [same_strides(a) for a in args if isinstance(a, torch.Tensor)]))


def same_strides(t: torch.Tensor, device: str = "cpu") -> torch.Tensor:
    """A copy of `t` on `device` with `t`'s strides (`clone` makes padded strides contiguous)."""
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=device).copy_(t)


def default_config(args) -> tuple:
    nums = [a for a in args if isinstance(a, int)]
    return (64, 4) if len(nums) == 1 else (16, 64, 4)


def launch(fn, args, config, **options) -> None:
    """`fn` on `args` with `config` ((XBLOCK, num_warps), or (YBLOCK, XBLOCK, num_warps)
    for a 2-D kernel) and Triton compile `options`."""
    import triton

    nums = [a for a in args if isinstance(a, int)]
    if len(nums) == 1:
        xb, warps = config
        fn[(triton.cdiv(nums[0], xb),)](*args, XBLOCK=xb, num_warps=warps, **options)
    else:
        yb, xb, warps = config
        y, x = nums
        fn[(triton.cdiv(x, xb), triton.cdiv(y, yb))](*args, YBLOCK=yb, XBLOCK=xb, num_warps=warps, **options)


def module(factory, device: str) -> dict:
    """The generated module with its kernels made by `factory(name, code)`, on `device`."""
    src = open(CODE).read()
    src = src.replace("async_compile = AsyncCompile()", "async_compile = _Factory()")
    src = src.split("\nrunner = Runner")[0] + "\nrunner = Runner(partitions=[])\ncall = runner.call\n"
    if device == "cpu":
        src = src.replace("guards._empty_strided_cuda", "guards._empty_strided_cpu")
        src = src.replace("from torch._C import _cuda_getCurrentRawStream as get_raw_stream",
                          "get_raw_stream = lambda i: 0")
        src = src.replace("with torch.cuda._DeviceGuard(0):", "if True:").replace("torch.cuda.set_device(0)", "pass")

    class _Factory:
        def triton(self, name, code, **kw):
            return factory(name, code)

        def wait(self, scope):
            for key, value in list(scope.items()):
                if type(value).__name__.endswith("Future"):
                    scope[key] = value.result()

    g = {"__name__": "generated", "_Factory": _Factory}
    exec(compile(src, CODE, "exec"), g)
    return g


def inputs(device: str):
    """The module's arguments and eager `assemble`'s (out, lse) for them."""
    from dilated_compile.lowering.common.block_kernels import block_attention
    from dilated_compile.lowering.dilated import compute, plan as plans

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 5, 300, 64, generator=g) for _ in range(3))
    plan = plans.make_plan(5, 300, (64, 128, 256), (1, 2, 4), "longnet", plans.ALL_PARTS_SMALL, 0)
    qs, ks, vs = (compute.gather_calls(plan, x) for x in (q, k, v))
    res = [block_attention(a, b, c, is_causal=True, scale=0.125) for a, b, c in zip(qs, ks, vs)]
    outs, lses = [r.out.contiguous() for r in res], [r.lse.contiguous() for r in res]
    want = compute.assemble(plan, outs, lses, 2, q)
    by_shape = {tuple(t.shape): t for t in outs + lses}
    args = []
    for s in SHAPES:
        t = by_shape[s]
        if s == (2, 5, 44, 64):  # the module wants strides (14080, 64, 320, 1)
            t = t.transpose(1, 2).contiguous().transpose(1, 2)
        args.append(t.to(device))
    return args, want


def diff(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    same_inf = torch.isinf(a) & torch.isinf(b) & (torch.sign(a) == torch.sign(b))
    return float((a - b).abs().masked_fill(same_inf, 0.0).nan_to_num(nan=float("inf")).max())


def record(path: str) -> None:
    args, want = inputs("cpu")
    out, lse = module(Recorded, "cpu")["call"](list(args))
    print(f"interpreter: out {diff(out, want[0]):.3g}, lse {diff(lse, want[1]):.3g}")
    torch.save(Recorded.record, path)


def to_cuda(t):
    return same_strides(t, "cuda") if isinstance(t, torch.Tensor) else t


def kernel_sources() -> dict[str, str]:
    """Each generated kernel's source by name."""
    code: dict[str, str] = {}
    module(lambda name, src: code.setdefault(name, src), "cpu")
    return code


def replayed(fn, before, config, **options) -> list[torch.Tensor]:
    """Kernel `fn` launched on the GPU with `config` on copies of the recorded inputs
    `before`: its tensor arguments after the launch."""
    args = [to_cuda(a) for a in before]
    launch(fn, args, config, **options)
    torch.cuda.synchronize()
    return [a for a in args if isinstance(a, torch.Tensor)]


def kernel_error(ref_path: str, kernel: str, config: tuple) -> float:
    """Largest difference from the interpreter of generated kernel number `kernel`
    launched on the GPU with `config` on its recorded inputs."""
    name, before, after = next(r for r in torch.load(ref_path) if r[0].endswith("_" + kernel))
    got = replayed(kernel_function(name, kernel_sources()[name]), before, config)
    return max(diff(g, w) for g, w in zip(got, after))


def variants(name: str, code: str, before, after) -> None:
    """Kernel `name` on the recorded inputs, as generated and rewritten, one config:
    which of its outputs differ, where, and with what values."""
    for variant in VARIANTS:
        for extra in ({}, {"enable_fp_fusion": False}):
            got = [a.cpu() for a in replayed(kernel_function(name, code, variant), before, (64, 4), **extra)]
            report = []
            for i, (g, w) in enumerate(zip(got, after)):
                bad = ~((g == w) | (g - w).abs().le(1e-4) | (g.isnan() & w.isnan()))
                if bad.any():
                    idx = bad.flatten().nonzero()[:4, 0].tolist()
                    pairs = [(round(w.flatten()[j].item(), 4), round(g.flatten()[j].item(), 4)) for j in idx]
                    report.append(f"arg {i}: {int(bad.sum())} wrong, (want, got) {pairs}")
            print(f"  kernel {name[-1]} {variant} {extra}: {'; '.join(report) or 'right'}", flush=True)


def gpu(path: str) -> None:
    rec = torch.load(path)
    code = kernel_sources()
    for name, before, after in rec:
        if name[-1] in "26":
            variants(name, code[name], before, after)
        if os.environ.get("SWEEP", "1") == "0":
            continue
        fn = kernel_function(name, code[name])
        two_d = len([a for a in before if not isinstance(a, torch.Tensor)]) == 2
        if two_d:
            configs = list(itertools.product((1, 2, 4, 8, 16, 32, 64, 128, 256, 512), (8, 16), (1, 2, 4, 8)))
        else:
            configs = list(itertools.product((16, 32, 64, 128, 256, 512, 1024), (1, 2, 4, 8)))
        wrong = []
        for config in configs:
            err = max(diff(g, w) for g, w in zip(replayed(fn, before, config), after))
            if err > 1e-4:
                wrong.append((config, round(err, 4)))
        print(f"{name[:60]}...{name[-2:]}: {len(wrong)} of {len(configs)} configs wrong "
              f"{wrong[:12]}", flush=True)
    # the module as Inductor runs it (its own autotuned configs)
    from torch._inductor.async_compile import AsyncCompile

    ac = AsyncCompile()
    g = module(lambda name, src: ac.triton(name, src, device_str="cuda"), "cuda")
    args, want = inputs("cuda")
    for attempt in range(3):
        out, lse = g["call"](list(args))
        print(f"Inductor's launch {attempt}: out {diff(out, want[0]):.3g}, lse {diff(lse, want[1]):.3g}")
    for name in code:
        k = g[name]
        print(f"  {name[-2:]}: {[str(l.config) for l in getattr(k, 'launchers', [])]}")


if __name__ == "__main__":
    {"record": record, "gpu": gpu}[sys.argv[1]](sys.argv[2])
