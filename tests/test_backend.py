"""backend='dilated' end to end on CPU: rewrite, Inductor, forward and backward."""

import subprocess
import sys
import textwrap
from importlib.metadata import entry_points

import pytest
import torch
from torch._dynamo.utils import counters

import dilated_compile
from dilated_compile import dilated_attention, dilated_reference, load_policy

from .models import CheckpointedBlocks, TinyModel, dilated_rule, policy, restore, with_attention_replaced
from .tolerance import budget
from .training_common import fresh_dynamo  # noqa: F401 - autouse: a fresh Dynamo, counters and reports per test


def test_entry_point_is_registered():
    names = [ep.name for ep in entry_points(group="torch_dynamo_backends")]
    assert "dilated" in names


def test_backend_name_works_without_importing_the_package():
    code = textwrap.dedent(
        """
        import sys, torch, torch.nn.functional as F
        def f(q):
            return F.scaled_dot_product_attention(q, q, q, is_causal=True)
        pol = {"version": 1, "rules": [{"match": "**", "attention": "dilated",
               "segment_lengths": [4], "dilation_rates": [2]}]}
        assert "dilated_compile" not in sys.modules
        # compiler "eager": the backend's own name resolution is what runs here, not Inductor
        out = torch.compile(f, backend="dilated", options={"policy": pol, "compiler": "eager"})(
            torch.randn(1, 2, 8, 4))
        from torch._dynamo.utils import counters
        print("rewritten", counters["dilated"]["rewritten"], out.shape)
        """
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "rewritten 1" in res.stdout


def _run(model, x, options):
    compiled = torch.compile(model, backend="dilated", options=options)
    out = compiled(x)
    out.sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    return out, grads


# (Inductor's code for these: the groups split in tests/test_dilated.py, longnet in tests/test_hf_models.py)
@pytest.mark.parametrize("head_split,is_causal", [("groups", True), ("groups", False), ("longnet", True),
                                                  ("longnet", False)])
def test_compiled_forward_backward_match_eager_rewrite(head_split, is_causal):
    """Compiled = the same model run eagerly with its attention replaced by
    dilated_attention, forward and parameter gradients; and close to float64."""
    torch.manual_seed(0)
    seg, rates = (8, 16), (1, 4)
    model = TinyModel(heads=(5, 3), is_causal=is_causal, style="keyword")
    x = torch.randn(2, 37, 16)
    pol = policy(dilated_rule(seg=seg, rates=rates, head_split=head_split))
    out, grads = _run(model, x, {"policy": pol})

    def eager_fn(q, k, v, m):
        return dilated_attention(q, k, v, seg, rates, head_split=head_split, is_causal=is_causal)

    saved = with_attention_replaced(model, eager_fn)
    try:
        expected = model(x)
        expected.sum().backward()
    finally:
        restore(saved)
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=1e-4)
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, atol=5e-5, rtol=1e-4, msg=name)
    assert counters["dilated"]["rewritten"] == 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_compiled_attention_within_tolerance_of_reference(dtype):
    """The rewritten SDPA itself, compiled, against the float64 reference. (Inductor's CPU
    fusions of the bfloat16 lowering round differently from the eager ops: they run with
    DILATED_COMPILER=inductor, not in the default suite; on CUDA the site is one opaque op,
    tests/test_gpu.py.)"""
    seg, rates = (16, 32, 64), (1, 6, 12)

    def f(q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3)

    pol = policy(dilated_rule(match="**", seg=seg, rates=rates, head_split="longnet"))
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 7, 100, 16, generator=g).to(dtype) for _ in range(3))
    out = torch.compile(f, backend="dilated", options={"policy": pol})(q, k, v)
    ref = dilated_reference(q, k, v, seg, rates, head_split="longnet", is_causal=True, scale=0.3)
    err = (out.double() - ref).abs().max().item()
    assert err <= budget(q, k, v, is_causal=True, scale=0.3, ref=ref), (dtype, err)


@pytest.mark.inductor
def test_unmatched_sites_are_bit_identical_to_inductor():
    torch.manual_seed(1)
    model = TinyModel(heads=(4, 2))
    x = torch.randn(2, 24, 16)
    pol = policy(dilated_rule(match="encoder.*"))
    ours = torch.compile(model, backend="dilated", options={"policy": pol})(x)
    torch._dynamo.reset()
    inductor = torch.compile(model, backend="inductor")(x)
    assert torch.equal(ours, inductor)
    assert counters["dilated"]["left"] == 2 and counters["dilated"]["rewritten"] == 0


def test_counters_and_report():
    model = TinyModel(heads=(4, 2, 3))
    x = torch.randn(1, 40, 16)
    pol = policy(dilated_rule(match="layers.0"), dilated_rule(match="layers.2.attn", head_split="longnet"))
    torch.compile(model, backend="dilated", options={"policy": pol})(x)
    assert counters["dilated"]["rewritten"] == 2 and counters["dilated"]["left"] == 1
    (report,) = dilated_compile.reports()
    by_module = {s.module: s for s in report.sites}
    assert set(by_module) == {"layers.0.attn", "layers.1.attn", "layers.2.attn"}
    assert by_module["layers.0.attn"].status == "rewritten"
    assert by_module["layers.0.attn"].attention.startswith("dilated groups")
    assert by_module["layers.2.attn"].attention.startswith("dilated longnet")
    # which kernel a rewritten site runs, and why, in the row the user sees
    assert "kernel: gathered blocks (not CUDA)" in by_module["layers.0.attn"].attention
    assert "kernel: gathered blocks (not CUDA)" in str(report)
    assert by_module["layers.1.attn"].status == "left"
    assert "no rule matches" in by_module["layers.1.attn"].reason
    assert "layers.1.attn" in str(report)
    removed = [l for l in report.diff.splitlines() if l.startswith("-") and "scaled_dot_product_attention" in l]
    added = [l for l in report.diff.splitlines() if l.startswith("+")]
    added = [l for l in added if "dilated_compile_lowering_dilated_attention_dilated_attention(" in l]
    assert len(removed) == 2 and len(added) == 2


@pytest.mark.inductor
def test_gradient_in_the_outputs_layout_is_not_copied():
    """A rewritten attention's output is stored (B, N, H, D); a gradient arriving in that layout
    is used as it is (torch 2.11-2.12's AOTAutograd copied it to contiguous on every backward
    unless the backend asks otherwise; torch 2.13 does this by default), and the gradients are
    still right."""
    from torch.profiler import profile

    import torch.nn.functional as F

    seg, rates = [8, 16], [1, 2]
    pol = policy(dilated_rule(match="re:.*", seg=seg, rates=rates))
    f = torch.compile(lambda q, k, v: F.scaled_dot_product_attention(q, k, v), backend="dilated",
                      options={"policy": pol})
    q, k, v = (torch.randn(1, 32, 4, 8).transpose(1, 2).requires_grad_() for _ in range(3))
    out = f(q, k, v)
    grad = torch.randn(1, 32, 4, 8).transpose(1, 2)
    assert grad.stride() == out.stride()
    with profile() as prof:
        out.backward(grad)
    assert "aten::contiguous" not in {e.name for e in prof.events()}
    want = [x.detach().requires_grad_() for x in (q, k, v)]
    dilated_attention(*want, seg, rates).backward(grad)
    for got, ref in zip((q, k, v), want):
        torch.testing.assert_close(got.grad, ref.grad)
    import torch._functorch.config as functorch_config

    (report,) = dilated_compile.reports()
    chose = "functorch.guess_tangent_strides_as_outputs" in report.inductor_settings
    assert chose != functorch_config.guess_tangent_strides_as_outputs  # only where not the default
    assert ("functorch: guess_tangent_strides_as_outputs (on" in str(report)) == chose


@pytest.mark.parametrize("source", ["dict", "path", "object"])
def test_policy_sources(tmp_path, source):
    doc = policy(dilated_rule())
    if source == "path":
        import yaml

        path = tmp_path / "p.yaml"
        path.write_text(yaml.safe_dump(doc))
        pol = str(path)
    elif source == "object":
        pol = load_policy(doc)
    else:
        pol = doc
    torch.compile(TinyModel(), backend="dilated", options={"policy": pol})(torch.randn(1, 20, 16))
    assert counters["dilated"]["rewritten"] == 2


def test_missing_policy_is_an_error():
    with pytest.raises(Exception, match="needs a policy"):
        torch.compile(TinyModel(), backend="dilated")(torch.randn(1, 8, 16))


def test_unknown_option_is_an_error_with_suggestion():
    with pytest.raises(Exception, match="did you mean 'policy'"):
        torch.compile(TinyModel(), backend="dilated", options={"polciy": "x.yaml"})(torch.randn(1, 8, 16))


@pytest.mark.parametrize("compiler", ["aot_eager", "eager"])
def test_compiler_option_runs_the_rewritten_graph_without_inductor(compiler):
    """compiler 'aot_eager' runs the same rewritten graph op by op, 'eager' as captured: the eager
    rewrite's numbers."""
    import torch.nn.functional as F

    seg, rates = [8, 16], [1, 2]
    pol = policy(dilated_rule(match="**", seg=seg, rates=rates, head_split="longnet"))
    q, k, v = (torch.randn(1, 3, 40, 8, generator=torch.Generator().manual_seed(i)) for i in range(3))
    f = torch.compile(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
                      backend="dilated", options={"policy": pol, "compiler": compiler})
    want = dilated_attention(q, k, v, seg, rates, head_split="longnet", is_causal=True)
    torch.testing.assert_close(f(q, k, v), want, atol=1e-6, rtol=1e-6)
    assert counters["dilated"]["rewritten"] == 1


@pytest.mark.parametrize("compiler,warms", [("inductor", 1), ("aot_eager", 0)])
def test_the_backend_starts_inductors_compile_workers_first_as_inductors_does(monkeypatch, compiler, warms):
    """Compiling with Inductor, the backend starts Inductor's compile workers before its
    passes run, as backend="inductor" does when called: they take seconds to start, and
    the rewritten attention's kernels are handed to them while the graph is traced."""
    import torch._inductor.async_compile as async_compile

    from dilated_compile import backend

    events = []
    real_warm, real_passes = async_compile.maybe_warm_pool, backend.run_passes
    monkeypatch.setattr(async_compile, "maybe_warm_pool", lambda: events.append("warm") or real_warm())
    monkeypatch.setattr(backend, "run_passes", lambda *a: events.append("passes") or real_passes(*a))
    x = torch.randn(1, 8, 16)
    torch.compile(TinyModel(), backend="dilated", options={"policy": policy(dilated_rule()), "compiler": compiler})(x)
    assert events == ["warm"] * warms + ["passes"]


@pytest.mark.parametrize("options,message", [
    ({"compiler": "aot_eagr"}, "unknown compiler 'aot_eagr'; did you mean 'aot_eager'"),
    ({"compiler": "aot_eager", "max_autotune": True}, r"Inductor settings \['max_autotune'\] would have no effect"),
    ({"compiler": "eager", "mode": "max-autotune"}, r"compiler 'eager' does not run Inductor"),
])
def test_compiler_option_errors_say_what_to_change(options, message):
    with pytest.raises(Exception, match=message):
        torch.compile(TinyModel(), backend="dilated", options={"policy": policy(dilated_rule()), **options})(
            torch.randn(1, 8, 16))


def test_bad_policy_file_surfaces_policy_error(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("version: 1\nrules:\n  - match: a\n    attention: dilatd\n")
    with pytest.raises(Exception, match=r"bad.yaml:4.*did you mean 'dilated'"):
        torch.compile(TinyModel(), backend="dilated", options={"policy": str(path)})(torch.randn(1, 8, 16))


def test_eager_function_inside_user_compiled_code():
    """dilated_attention called from user code under torch.compile: one graph, no warning."""
    import warnings

    def f(q, k, v):
        return dilated_attention(q, k, v, (4, 8), (1, 2), head_split="longnet", is_causal=True)

    q, k, v = (torch.randn(1, 3, 19, 8) for _ in range(3))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        out = torch.compile(f, backend="inductor", fullgraph=True)(q, k, v)
    torch.testing.assert_close(out, f(q, k, v), atol=1e-5, rtol=1e-5)


def test_sites_inside_activation_checkpointing_train_like_eager():
    """Checkpointed blocks become nested graphs in Dynamo; their attention is
    found, rewritten, and training matches the eager rewrite step by step.
    (The `groups` split: a longnet site, about twice the graph pieces and the
    compile time, inside checkpointed layers: `tests/test_training.py::
    test_reentrant_checkpointing_rewrites_sites_and_matches_reference`.)"""
    import copy

    torch.manual_seed(0)
    seg, rates = (8, 16), (1, 4)
    model = CheckpointedBlocks(heads=(5, 3))
    reference = copy.deepcopy(model)
    x = torch.randn(2, 37, 16)
    pol = policy(dilated_rule(match="**.attn", seg=seg, rates=rates, head_split="groups"))
    compiled = torch.compile(model, backend="dilated", options={"policy": pol})

    def eager_fn(q, k, v, m):
        return dilated_attention(q, k, v, seg, rates, head_split="groups", is_causal=True)

    saved = with_attention_replaced(reference, eager_fn)
    opt_c = torch.optim.SGD(model.parameters(), lr=0.1)
    opt_r = torch.optim.SGD(reference.parameters(), lr=0.1)
    try:
        for _ in range(4):
            loss_c = compiled(x).pow(2).mean()
            loss_r = reference(x).pow(2).mean()
            loss_c.backward()
            loss_r.backward()
            torch.testing.assert_close(loss_c, loss_r, atol=1e-5, rtol=1e-5)
            for (name, a), b in zip(model.named_parameters(), reference.parameters()):
                torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-4, msg=name)
            opt_c.step(), opt_r.step(), opt_c.zero_grad(), opt_r.zero_grad()
    finally:
        restore(saved)
    assert counters["dilated"]["rewritten"] == 2 and counters["dilated"]["left"] == 0
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]


def test_training_loop_at_fixed_shape_compiles_once():
    """8 optimizer steps: one graph, no recompile (Dynamo raises on any), loss goes down."""
    torch.manual_seed(0)
    model = TinyModel(heads=(5, 3))
    x, target = torch.randn(2, 40, 16), torch.randn(2, 40, 16)
    pol = policy(dilated_rule(seg=(8, 16, 32), rates=(1, 2, 4), head_split="longnet"))
    compiled = torch.compile(model, backend="dilated", options={"policy": pol})
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)

    def step():
        loss = (compiled(x) - target).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss.item()

    losses = [step()]
    with torch._dynamo.config.patch(error_on_recompile=True):
        losses += [step() for _ in range(7)]
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]
    assert counters["dilated"]["rewritten"] == 2
    assert losses[-1] < losses[0]
