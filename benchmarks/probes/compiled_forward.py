"""Probe: the compiled dilated site's forward without grad, against the eager op.

    TORCH_LOGS=output_code python benchmarks/probes/compiled_forward.py [N] 2> code.txt

bf16, B=1, H=16, D=128, `groups` (the benchmark's segments), q/k/v stored
(B, N, H, D): wall time (do_bench, alternating eager and compiled three
times), host time to issue one call (GPU idle before it), whether the call
synchronises with the GPU (torch's sync debug mode), and the profile of five
calls: the CPU ops by own time and the CUDA kernels.
"""
import os
import sys

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile
from triton.testing import do_bench

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
from dilated_compile import dilated_attention  # noqa: E402

SEG, RATES = [2048, 4096, 8192, 16384, 32768], [1, 2, 4, 8, 16]
POLICY = {"version": 1, "rules": [{"match": "re:.*", "attention": "dilated", "head_split": "groups",
                                   "segment_lengths": SEG, "dilation_rates": RATES}]}

sys.path.insert(0, os.path.dirname(__file__))
from op_overhead import cuda_qkv, host_us  # noqa: E402


def main():
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 32768
    q, k, v = cuda_qkv(n)
    eager = lambda: dilated_attention(q, k, v, SEG, RATES)  # noqa: E731
    site = torch.compile(lambda q, k, v: F.scaled_dot_product_attention(q, k, v),
                         backend="dilated", options={"policy": POLICY})
    compiled = lambda: site(q, k, v)  # noqa: E731
    print(torch.cuda.get_device_name(), torch.__version__)
    with torch.no_grad():
        compiled()
        for _ in range(3):
            print(f"do_bench eager {do_bench(eager):.3f} ms, compiled {do_bench(compiled):.3f} ms")
        print(f"host: eager {host_us(eager):.1f} us, compiled {host_us(compiled):.1f} us")
        for name, fn in (("eager", eager), ("compiled", compiled)):
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                fn()
                print(f"{name}: no synchronisation")
            except RuntimeError as e:
                print(f"{name}: synchronises: {str(e).splitlines()[0]}")
            finally:
                torch.cuda.set_sync_debug_mode("default")
        for name, fn in (("eager", eager), ("compiled", compiled)):
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for _ in range(5):
                    fn()
                torch.cuda.synchronize()
            print(f"== {name}: profile of 5 calls")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


if __name__ == "__main__":
    main()
