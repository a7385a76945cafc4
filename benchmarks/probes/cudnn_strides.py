"""Probe: which stride layouts cuDNN attention's backward gets right (device-only)."""
import torch
from dilated_compile.lowering import kernels
aten = torch.ops.aten
torch.manual_seed(0)
def grads_ref(q, k, v, g):
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    o = torch.softmax(qd @ kd.transpose(-1, -2) * 0.125, -1) @ vd
    o.backward(g.double())
    return qd.grad, kd.grad, vd.grad
for name, shape, perm in [("heads1 contiguous", (6, 1, 100, 64), None), ("heads4 contiguous", (6, 4, 100, 64), None),
                          ("heads4 BSHD storage", (6, 100, 4, 64), (0, 2, 1, 3))]:
    q, k, v = (torch.randn(shape, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    if perm: q, k, v = (t.permute(perm) for t in (q, k, v))
    res = kernels.block_attention(q, k, v, is_causal=False, scale=0.125)
    g = torch.randn_like(res.out)
    ref = grads_ref(q, k, v, g)
    for variant, (o, d) in {"as returned": (res.out, g), "out contiguous": (res.out.contiguous(), g.contiguous()),
                            "out like q": (torch.empty_like(q).copy_(res.out), torch.empty_like(q).copy_(g)),
                            "out BSHD": (res.out.transpose(1, 2).contiguous().transpose(1, 2), g.transpose(1, 2).contiguous().transpose(1, 2))}.items():
        dq, dk, dv = kernels.block_attention_backward(d, q, k, v, o, res.lse, is_causal=False, scale=0.125)
        errs = [(a.double() - b).abs().max().item() for a, b in zip((dq, dk, dv), ref)]
        print(f"{name:20s} {variant:15s} out strides {tuple(o.stride())} q {tuple(q.stride())} -> errs {[round(e, 3) for e in errs]}")
    print(name, "returned out strides", res.out.stride(), "lse", res.lse.shape, res.lse.stride())
