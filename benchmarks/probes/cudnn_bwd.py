"""Probe: how to call cuDNN attention's backward op directly (device-only)."""
import torch
aten = torch.ops.aten
q, k, v = (torch.randn(4, 1, 256, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
res = aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, True, False, scale=0.125)
for i, r in enumerate(res):
    print(i, type(r), getattr(r, "shape", r), getattr(r, "dtype", None), getattr(r, "stride", lambda: None)())
out, lse = res[0], res[1]
g = torch.randn_like(out)
ref = torch.autograd.grad(out, (q, k, v), g, retain_graph=True)
variants = {
    "none_bias_fwd_rng": lambda: aten._scaled_dot_product_cudnn_attention_backward(g, q, k, v, out, lse, res[6], res[7], None, res[2], res[3], 256, 256, 0.0, True, scale=0.125),
    "fwd_outputs_all": lambda: aten._scaled_dot_product_cudnn_attention_backward(g, q, k, v, out, lse, res[6], res[7], res[8], res[2], res[3], 256, 256, 0.0, True, scale=0.125),
}
for name, fn in variants.items():
    try:
        dq, dk, dv = fn()
        print(name, "OK", [(a.float() - b.float()).abs().max().item() for a, b in zip((dq, dk, dv), ref)])
    except Exception as e:
        print(name, "ERR", str(e)[:300])
