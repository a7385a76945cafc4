"""Run by tests/test_precompile.py in a fresh process on CUDA: compile a module whose
attention becomes dilated attention on one path (``work list`` or ``gathered blocks``,
argv 2), train one step, and print as JSON which of the package's kernels were
handed to the compile workers and whether each of the step's own compiles of them
found Triton's disk cache filled, and each of their launcher stubs too."""

import json
import logging
import os
import sys
import tempfile

os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp()
os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp()
os.environ["DILATED_WORKLIST"] = {"work list": "on", "gathered blocks": "off"}[sys.argv[2]]

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

from gpt_train_measure import package_compiles, wait_for_compile_workers  # noqa: E402
from dilated_compile.lowering.common import precompile  # noqa: E402

# launcher stubs of the package's kernels made in this process, and whether each was built here
# (gcc) or loaded from Triton's cache
from triton.backends.nvidia import driver as nvidia_driver  # noqa: E402
from triton.runtime import build  # noqa: E402

builds = []
launchers = []
_build, _launcher_init = build._build, nvidia_driver.CudaLauncher.__init__


def counting_build(*args, **kwargs):
    builds.append(args[0])
    return _build(*args, **kwargs)


def recording_launcher_init(self, src, metadata):
    before = len(builds)
    _launcher_init(self, src, metadata)
    fn = getattr(src, "fn", None)
    if getattr(fn, "module", "").startswith("dilated_compile."):
        launchers.append({"kernel": fn.fn.__name__, "built_here": len(builds) > before})


build._build = counting_build
nvidia_driver.CudaLauncher.__init__ = recording_launcher_init
logging.basicConfig(level=logging.INFO)  # why a kernel was not precompiled, for the test's message


class Attention(torch.nn.Module):
    def __init__(self, heads: int = 4, head_dim: int = 64):
        super().__init__()
        self.heads = heads
        self.qkv = torch.nn.Linear(heads * head_dim, 3 * heads * head_dim)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, -1).unbind(2)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        return y.transpose(1, 2).flatten(2)


wait_for_compile_workers()  # as in any compile after a process's first

head_split = sys.argv[1]
policy = {"version": 1, "rules": [{"match": "re:.*", "attention": "dilated", "segment_lengths": [256, 512],
                                   "dilation_rates": [1, 2], "head_split": head_split}]}
model = Attention().cuda().to(torch.bfloat16)
compiled = torch.compile(model, backend="dilated", options={"policy": policy})
x = torch.randn(1, 1000, 256, device="cuda", dtype=torch.bfloat16)
with package_compiles() as compiles:
    compiled(x).float().square().mean().backward()
    torch.cuda.synchronize()
submitted = sorted({key[2].name for key in precompile._SUBMITTED})
print(json.dumps({"submitted": submitted, "compiles": compiles, "launchers": launchers}))
