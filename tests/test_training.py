"""The compiled model in real training loops: dynamic lengths without
recompiles, compiled-graph caches across processes, activation checkpointing,
max-autotune, concurrent calls and bounded caches, the long-context example."""

import copy
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch._dynamo.utils import counters

import dilated_compile
from dilated_compile import block_sparse_reference, dense_reference, dilated_reference
from dilated_compile.lowering.dilated import plan as dilated_lowering
from dilated_compile.lowering.dilated.arguments import encode_parameters
from dilated_compile.lowering.dilated.op import dynamic_dilated_attention
from dilated_compile.lowering.block_sparse.op import dynamic_block_sparse_attention

from .models import CheckpointedBlocks, TinyModel, dilated_rule, policy, restore, with_attention_replaced
from .tolerance import assert_within

ROOT = Path(__file__).resolve().parents[1]
SEG, RATES = (8, 16), (1, 2)
LENGTHS = (20, 32, 37, 64, 97)  # multiples and non-multiples of the segments, and N < w


# transformers keeps an explicit causal mask while compiling on torch before 2.13, so an HF
# model's mask reaches a frame's graph as an input and its sites are left with that reason
# (with a warning): see docs/limitations.md.
hf_mask_is_constant = pytest.mark.skipif(
    tuple(int(x) for x in torch.__version__.split(".")[:2]) < (2, 13),
    reason="transformers passes its causal mask as a graph input on torch < 2.13 (sites left, warned)",
)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    dilated_compile.clear_reports()
    yield
    torch._dynamo.reset()


def _reference_model(model, head_split, min_seq_len=0):
    """`model` copied, its attention replaced by the float64 reference (dense below min_seq_len)."""
    ref = copy.deepcopy(model)

    def attention(q, k, v, module):
        if q.shape[2] < min_seq_len:
            seg, rates, split = (q.shape[2],), (1,), "groups"
        else:
            seg, rates, split = SEG, RATES, head_split
        return dilated_reference(q, k, v, seg, rates, head_split=split, is_causal=True).to(q.dtype)

    return ref, with_attention_replaced(ref, attention)


def _backend_calls() -> int:
    return len(dilated_compile.reports())


# ---------------------------------------------------------------- dynamic lengths


@pytest.mark.parametrize("head_split", ["groups", "longnet"])
@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("n", [1, 5, 37, 64])
def test_dynamic_op_equals_reference(n, is_causal, head_split):
    """The custom op that symbolic-length sites call, forward and backward, vs float64."""
    torch.manual_seed(n)
    q, k, v = (torch.randn(2, 5, n, 8, requires_grad=True) for _ in range(3))
    out = dynamic_dilated_attention(q, k, v, SEG, RATES, head_split=head_split, is_causal=is_causal)
    _assert_matches_reference(
        out, (q, k, v), lambda *x: dilated_reference(*x, SEG, RATES, head_split=head_split, is_causal=is_causal),
        is_causal,
    )


def test_dynamic_op_is_dense_below_min_seq_len():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 3, 30, 8, dtype=torch.float64) for _ in range(3))
    out = dynamic_dilated_attention(q, k, v, SEG, RATES, is_causal=True, min_seq_len=31)
    dense = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(out, dense)
    sparse = dynamic_dilated_attention(q, k, v, SEG, RATES, is_causal=True, min_seq_len=30)
    torch.testing.assert_close(sparse, dilated_reference(q, k, v, SEG, RATES, is_causal=True))


def test_dynamic_op_passes_opcheck():
    q, k, v = (torch.randn(2, 3, 19, 8, requires_grad=True) for _ in range(3))
    torch.library.opcheck(
        torch.ops.dilated_compile.dilated_attention.default,
        (q, k, v, encode_parameters(SEG, RATES, "longnet"), True, 0.3, 0),
    )


def _assert_matches_reference(out, qkv, reference, is_causal) -> None:
    """`out` and the gradients of q, k, v equal `reference(q, k, v)` in float64."""
    q, k, v = qkv
    qd, kd, vd = (x.detach().double().requires_grad_() for x in qkv)
    ref = reference(qd, kd, vd)
    assert_within(out, ref, q, k, v, is_causal=is_causal)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, qkv, grad)
    want = torch.autograd.grad(ref, (qd, kd, vd), grad.double())
    for name, g, w in zip("qkv", got, want):
        torch.testing.assert_close(g.double(), w, atol=1e-5, rtol=1e-4, msg=f"d{name}")


def _train_over_lengths(model, reference, saved, pol, dynamic, lengths) -> list[int]:
    """One SGD step per length of `model` compiled with `pol` (fullgraph) and of `reference`:
    loss and gradients equal at every step, no recompile from the third length on.
    Returns Dynamo's unique graph count after each step; restores `saved` at the end."""
    compiled = torch.compile(model, backend="dilated", options={"policy": pol}, fullgraph=True, dynamic=dynamic)
    opt_c = torch.optim.SGD(model.parameters(), lr=0.05)
    opt_r = torch.optim.SGD(reference.parameters(), lr=0.05)
    graphs_after = []
    try:
        for step, n in enumerate(lengths):
            x, target = torch.randn(2, n, 16), torch.randn(2, n, 16)
            with torch._dynamo.config.patch(error_on_recompile=step >= 2):
                loss_c = (compiled(x) - target).pow(2).mean()
            loss_r = (reference(x) - target).pow(2).mean()
            loss_c.backward()
            loss_r.backward()
            torch.testing.assert_close(loss_c, loss_r, atol=1e-5, rtol=1e-5, msg=f"loss at N={n}")
            for (name, a), b in zip(model.named_parameters(), reference.parameters()):
                torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-4, msg=f"{name} at N={n}")
            for opt in (opt_c, opt_r):
                opt.step()
                opt.zero_grad()
            graphs_after.append(counters["stats"]["unique_graphs"])
    finally:
        restore(saved)
    return graphs_after


@pytest.mark.parametrize(
    "dynamic, head_split", [(True, "longnet"), (None, "groups")], ids=["dynamic_true", "automatic_dynamic"]
)
def test_lengths_train_like_reference_without_recompiles(dynamic, head_split):
    """fullgraph=True, one optimizer step per length: the compiled model's loss and
    gradients equal the same model with float64 reference attention, step by step.

    dynamic=True: one graph for every length. Automatic dynamic: the first length
    compiles a static graph, the second marks the length dynamic and compiles the
    custom-op graph, and no later length recompiles (error_on_recompile).
    """
    torch.manual_seed(0)
    model = TinyModel(heads=(5, 3))
    reference, saved = _reference_model(model, head_split)
    pol = policy(dilated_rule(seg=SEG, rates=RATES, head_split=head_split))
    graphs_after = _train_over_lengths(model, reference, saved, pol, dynamic, LENGTHS)
    assert not counters["graph_break"]
    if dynamic:
        assert graphs_after == [1] * len(LENGTHS)
    else:
        assert graphs_after == [1, 2, 2, 2, 2]
    reports = dilated_compile.reports()
    assert all(s.status == "rewritten" for s in reports[-1].sites)
    assert "dynamic length" in reports[-1].sites[0].attention


def test_dynamic_min_seq_len_is_decided_per_call():
    """A symbolic-length site cannot compare N with min_seq_len when compiled: the op
    runs dense attention below it and dilated attention from it, with one graph."""
    torch.manual_seed(0)
    model = TinyModel(heads=(4,))
    reference, saved = _reference_model(model, "groups", min_seq_len=40)
    pol = policy(dilated_rule(seg=SEG, rates=RATES), min_seq_len=40)
    compiled = torch.compile(model, backend="dilated", options={"policy": pol}, dynamic=True)
    try:
        for n in (24, 39, 40, 61):
            x = torch.randn(1, n, 16)
            torch.testing.assert_close(compiled(x), reference(x), atol=1e-5, rtol=1e-5, msg=f"N={n}")
    finally:
        restore(saved)
    assert counters["stats"]["unique_graphs"] == 1


# ---------------------------------------------------------------- caches across processes

_CACHE_PROBE = textwrap.dedent(
    """
    import json, sys, torch
    from torch._dynamo.utils import counters
    from tests.models import TinyModel, dilated_rule, policy
    torch.manual_seed(0)
    model = TinyModel(heads=(4,))
    pol = policy(dilated_rule(seg=(int(sys.argv[1]), 16), rates=(1, 2)))
    compiled = torch.compile(model, backend="dilated", options={"policy": pol})
    compiled(torch.randn(1, 40, 16)).sum().backward()
    print(json.dumps({"aot": dict(counters["aot_autograd"]), "inductor": dict(counters["inductor"]),
                      "rewritten": counters["dilated"]["rewritten"]}))
    """
)


def _probe_caches(cache_dir: Path, segment: int) -> dict:
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache_dir)}
    env.pop("TORCHINDUCTOR_FORCE_DISABLE_CACHES", None)
    res = subprocess.run(
        [sys.executable, "-c", _CACHE_PROBE, str(segment)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert res.returncode == 0, res.stderr[-4000:]
    import json

    return json.loads(res.stdout.strip().splitlines()[-1])


def test_second_process_hits_caches_and_changed_policy_misses(tmp_path):
    """Process 1 compiles (misses, saves); process 2, same policy, hits the FX graph and
    AOTAutograd caches; process 3, a changed policy, misses both."""
    first = _probe_caches(tmp_path, 8)
    assert first["rewritten"] == 1
    assert first["aot"].get("autograd_cache_miss") == 1 and first["aot"].get("autograd_cache_saved") == 1
    assert first["inductor"].get("fxgraph_cache_miss", 0) >= 2 and not first["inductor"].get("fxgraph_cache_hit")

    second = _probe_caches(tmp_path, 8)
    assert second["rewritten"] == 1
    assert second["aot"].get("autograd_cache_hit") == 1, second
    assert not second["aot"].get("autograd_cache_miss") and not second["aot"].get("autograd_cache_bypass")

    changed = _probe_caches(tmp_path, 4)
    assert changed["aot"].get("autograd_cache_miss") == 1 and not changed["aot"].get("autograd_cache_hit")
    assert changed["inductor"].get("fxgraph_cache_miss", 0) >= 2 and not changed["inductor"].get("fxgraph_cache_hit")


def test_cache_key_changes_with_policy_content_not_its_source():
    from dilated_compile.cache_key import cacheable_functions_patch

    a = cacheable_functions_patch(dilated_compile.load_policy(policy(dilated_rule(seg=(8, 16)))))
    b = cacheable_functions_patch(dilated_compile.load_policy(policy(dilated_rule(seg=(8, 16)))))
    c = cacheable_functions_patch(dilated_compile.load_policy(policy(dilated_rule(seg=(8, 32)))))
    assert a == b and set(a) == set(c) and a != c
    assert "dilated_compile.lowering.dilated.attention.dilated_attention" in a


@pytest.mark.parametrize("knob,value", [("DILATED_COMBINE", "inductor"), ("DILATED_KERNEL", "math")])
def test_cache_key_changes_with_the_lowering_env_knobs(monkeypatch, knob, value):
    """The knobs change what a site traces to, so a cached graph must not be reused across them."""
    from dilated_compile.cache_key import cacheable_functions_patch

    pol = dilated_compile.load_policy(policy(dilated_rule(seg=(8, 16))))
    monkeypatch.delenv(knob, raising=False)
    before = cacheable_functions_patch(pol)
    monkeypatch.setenv(knob, value)
    assert cacheable_functions_patch(pol) != before


# ---------------------------------------------------------------- activation checkpointing


HF_SEG, HF_RATES = (16, 32), (1, 2)
HF_POLICY = {"version": 1, "rules": [{"match": "**", "attention": "dilated", "segment_lengths": list(HF_SEG),
                                      "dilation_rates": list(HF_RATES), "head_split": "longnet"}]}
HF_SITES = [f"model.layers.{i}.self_attn" for i in range(2)]


def _tiny_llama():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   hidden_size=64, intermediate_size=128, vocab_size=128,
                                   max_position_embeddings=256)
    model = transformers.LlamaForCausalLM(cfg)
    model.set_attn_implementation("sdpa")
    return transformers, cfg, model


def _hf_reference_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                            is_causal=None, **kwargs):
    """HF's attention interface computing the policy's dilated attention in float64."""
    if attention_mask is not None:
        raise AssertionError("this test feeds no padding mask and HF keeps is_causal")
    groups = query.shape[1] // key.shape[1]
    key, value = (t.repeat_interleave(groups, dim=1) for t in (key, value))
    out = dilated_reference(query.double(), key.double(), value.double(), HF_SEG, HF_RATES,
                            head_split="longnet", is_causal=True, scale=scaling)
    return out.to(query.dtype).transpose(1, 2).contiguous(), None


@hf_mask_is_constant
def test_hf_gradient_checkpointing_rewrites_sites_and_keeps_gradients():
    """HF gradient_checkpointing_enable() on a tiny Llama: Dynamo traces the checkpointed
    layers whole (no graph break, in particular none at transformers' "caching is
    incompatible with gradient checkpointing" logger.warning_once), both layers'
    attention is rewritten, and two optimizer steps give the losses and gradients of
    the same model with the float64 dilated reference as its attention.

    An empty cache object is passed so that HF keeps `is_causal` instead of building
    an explicit causal mask (which it does with use_cache=False); dropping that cache is
    what makes each checkpointed layer log its warning.
    """
    transformers, cfg, checkpointed = _tiny_llama()
    torch.manual_seed(0)
    reference = copy.deepcopy(checkpointed)
    transformers.AttentionInterface.register("dilated_reference_test", _hf_reference_attention)
    reference.set_attn_implementation("dilated_reference_test")
    checkpointed.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert checkpointed.is_gradient_checkpointing
    compiled = torch.compile(checkpointed.train(), backend="dilated", options={"policy": HF_POLICY})
    models = (compiled, reference.train())
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (checkpointed, reference)]
    ids = torch.randint(0, 128, (2, 70))
    for _ in range(2):
        losses = []
        for m in models:
            cache = transformers.DynamicCache(config=cfg)
            loss = m(ids, labels=ids, use_cache=False, past_key_values=cache).loss
            loss.backward()
            losses.append(loss)
        torch.testing.assert_close(losses[0], losses[1], atol=1e-5, rtol=1e-5)
        for (name, a), b in zip(checkpointed.named_parameters(), reference.parameters()):
            torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-4, msg=name)
        for opt in opts:
            opt.step()
            opt.zero_grad()
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == 1
    sites = [s for r in dilated_compile.reports() for s in r.sites]
    assert [s.module for s in sites] == HF_SITES, [str(r) for r in dilated_compile.reports()]
    assert all(s.status == "rewritten" for s in sites) and counters["dilated"]["left"] == 0


_IMPORT_ORDER_PROBE = textwrap.dedent(
    """
    import json, torch
    from torch._dynamo.utils import counters
    import dilated_compile  # before transformers, which adds Logger.warning_once at import
    from tests.test_training import HF_POLICY, _tiny_llama
    transformers, cfg, model = _tiny_llama()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    compiled = torch.compile(model.train(), backend="dilated", options={"policy": HF_POLICY})
    ids = torch.randint(0, 128, (1, 40))
    compiled(ids, labels=ids, use_cache=False, past_key_values=transformers.DynamicCache(config=cfg))
    print(json.dumps({"breaks": dict(counters["graph_break"]), "rewritten": counters["dilated"]["rewritten"]}))
    """
)


@hf_mask_is_constant
def test_hf_gradient_checkpointing_compiles_whole_when_imported_before_transformers():
    """The Dynamo settings for HF's checkpointing layer take effect whatever the import
    order: dilated_compile imported before transformers, the layers still trace whole."""
    pytest.importorskip("transformers")
    res = subprocess.run([sys.executable, "-c", _IMPORT_ORDER_PROBE], cwd=ROOT, capture_output=True,
                         text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert res.returncode == 0, res.stderr[-4000:]
    import json

    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got == {"breaks": {}, "rewritten": 2}, got


def test_checkpointing_with_dynamic_lengths_trains_like_reference():
    """torch.utils.checkpoint around blocks whose sites have a symbolic length:
    the custom op is recomputed in the backward, gradients equal the reference."""
    torch.manual_seed(0)
    model = CheckpointedBlocks(heads=(4, 3))
    reference, saved = _reference_model(model, "longnet")
    pol = policy(dilated_rule(match="**.attn", seg=SEG, rates=RATES, head_split="longnet"))
    compiled = torch.compile(model, backend="dilated", options={"policy": pol}, dynamic=True)
    try:
        for n in (29, 48):
            x = torch.randn(2, n, 16)
            loss_c, loss_r = compiled(x).pow(2).mean(), reference(x).pow(2).mean()
            loss_c.backward()
            loss_r.backward()
            torch.testing.assert_close(loss_c, loss_r, atol=1e-5, rtol=1e-5)
            for (name, a), b in zip(model.named_parameters(), reference.parameters()):
                torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-4, msg=name)
                a.grad = b.grad = None
    finally:
        restore(saved)
    # the backend may run twice for the first call (Dynamo retraces once a symbolic
    # float attribute such as the dropout probability is guarded): count the last graph
    last = dilated_compile.reports()[-1].sites
    assert len(last) == 2 and all(s.status == "rewritten" and "dynamic length" in s.attention for s in last)
    assert counters["dilated"]["left"] == 0 and counters["stats"]["unique_graphs"] == 1


# ---------------------------------------------------------------- concurrency and bounded caches


def _module_level_caches():
    """Every functools cache defined at module level in the package, by dotted name."""
    import importlib
    import pkgutil

    found = {}
    for info in pkgutil.walk_packages(dilated_compile.__path__, "dilated_compile."):
        if info.name.endswith("__main__"):
            continue
        try:
            module = importlib.import_module(info.name)
        except ModuleNotFoundError as e:
            if e.name == "triton":  # the Triton kernels' module, where triton is not installed
                continue
            raise
        for name, obj in vars(module).items():
            if callable(getattr(obj, "cache_info", None)) and getattr(obj, "__module__", None) == info.name:
                found[f"{info.name}.{name}"] = obj
    return found


def test_every_module_level_cache_is_bounded():
    caches = _module_level_caches()
    assert "dilated_compile.lowering.dilated.plan.make_plan" in caches
    unbounded = [name for name, fn in caches.items() if fn.cache_parameters()["maxsize"] is None]
    assert not unbounded, f"unbounded caches: {unbounded}"
    from dilated_compile.passes import report

    assert report._RECENT.maxlen == 64


_THREADS_PROBE = textwrap.dedent(
    """
    import threading

    import torch
    from torch._dynamo.utils import counters

    from dilated_compile.lowering.dilated import plan as dilated_lowering
    from tests.models import TinyModel, dilated_rule, policy

    torch.manual_seed(0)
    model = TinyModel(heads=(5, 3))
    pol = policy(dilated_rule(seg=(8, 16), rates=(1, 2), head_split="longnet"))
    compiled = torch.compile(model, backend="dilated", options={"policy": pol}, dynamic=True)
    inputs = [torch.randn(1, 20 + 7 * i, 16, requires_grad=True) for i in range(8)]
    expected = []
    for x in inputs:
        y = compiled(x)
        (g,) = torch.autograd.grad(y.sum(), x)
        expected.append((y.detach(), g))
    dilated_lowering.make_plan.cache_clear()
    results = [None] * 8
    errors = []

    def call(i):
        try:
            for _ in range(3):
                y = compiled(inputs[i])
                (g,) = torch.autograd.grad(y.sum(), inputs[i])
                results[i] = (y.detach(), g)
        except Exception as exc:  # surfaced by the assert below
            errors.append(exc)

    with torch._dynamo.config.patch(error_on_recompile=True):
        threads = [threading.Thread(target=call, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
    assert not errors and not any(t.is_alive() for t in threads), errors
    for (y, g), (want_y, want_g) in zip(results, expected):
        assert torch.equal(y, want_y) and torch.equal(g, want_g)
    info = dilated_lowering.make_plan.cache_info()
    assert 0 < info.currsize <= info.maxsize == 256, info
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    print("threads ok")
    """
)


def test_threads_share_one_dynamic_model_and_caches_stay_bounded():
    """8 threads call one compiled model (symbolic length) at their own lengths: every
    result equals the single-threaded one, nothing recompiles, and the plan cache,
    filled concurrently at run time by the custom op, stays within its bound.

    In a process of its own: on torch 2.11 Dynamo compiling in threads leaves dynamic-shape
    state that `torch._dynamo.reset()` does not clear, and later tests' compile counts change."""
    res = subprocess.run(
        [sys.executable, "-c", _THREADS_PROBE], cwd=ROOT, capture_output=True, text=True, timeout=900,
    )
    assert res.returncode == 0 and "threads ok" in res.stdout, res.stderr[-4000:]


# ---------------------------------------------------------------- max-autotune


def test_max_autotune_on_cpu_compiles_and_matches_reference():
    torch.manual_seed(0)
    model = TinyModel(heads=(4,))
    reference, saved = _reference_model(model, "groups")
    pol = policy(dilated_rule(seg=SEG, rates=RATES))
    compiled = torch.compile(model, backend="dilated", options={"policy": pol, "mode": "max-autotune"})
    x = torch.randn(2, 37, 16, requires_grad=True)
    try:
        out, want = compiled(x), reference(x)
        torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
        (g,) = torch.autograd.grad(out.sum(), x)
        (g_ref,) = torch.autograd.grad(want.sum(), x)
        torch.testing.assert_close(g, g_ref, atol=1e-5, rtol=1e-4)
    finally:
        restore(saved)
    assert counters["dilated"]["rewritten"] == 1


# ---------------------------------------------------------------- the long-context example

EXAMPLE = ROOT / "examples" / "long_context_train.py"
TINY = ["--device", "cpu", "--n-embd", "32", "--n-layer", "2", "--segments", "64,128,256", "--rates", "1,2,4"]


def test_long_context_example_runs_on_cpu():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    res = subprocess.run(
        [sys.executable, str(EXAMPLE), "--seq-len", "512", *TINY],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert res.returncode == 0, res.stdout + res.stderr[-4000:]
    assert "N=     512" in res.stdout and "grads finite: True" in res.stdout
    assert "attention sites rewritten: 2 of 2" in res.stdout


def test_long_context_example_sweep_writes_json_and_png(tmp_path):
    """The sweep at tiny lengths with --dynamic (one compile for all lengths)."""
    import importlib.util
    import json

    spec = importlib.util.spec_from_file_location("long_context_train", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    assert example.main(["--sweep", "--lengths", "200,300,400", "--dynamic", "--out", str(tmp_path), *TINY]) == 0
    doc = json.loads((tmp_path / "peak_memory.json").read_text())
    assert [r["seq_len"] for r in doc["results"]] == [200, 300, 400]
    assert all(r["grads_finite"] and r["peak_bytes"] > 0 for r in doc["results"])
    assert set(doc["fit"]) == {"bytes_per_token", "intercept_bytes", "max_relative_residual"}
    assert (tmp_path / "peak_memory.png").stat().st_size > 1000
    assert counters["stats"]["unique_graphs"] == 1
    fit = example.fit_line([1, 2, 3], [12, 22, 32])
    assert fit["bytes_per_token"] == pytest.approx(10) and fit["intercept_bytes"] == pytest.approx(2)


# ---------------------------------------------------------------- block-sparse, dynamic lengths

BLOCK = 8
BS_PATTERNS = {
    "local_window": {"kind": "local_window", "window": 1},
    "global_local": {"kind": "global_local", "window": 1, "global_blocks": 1},
    "dilated": {"kind": "dilated", "window": 0, "stride": 2},
}
BS_LENGTHS = (20, 32, 37, 64, 97)  # multiples of BLOCK and not, N < BLOCK * (pattern's reach)


def _block_sparse_rule(kind, **extra):
    return {"match": "layers.*.attn", "attention": "block_sparse", "block_size": BLOCK,
            "pattern": BS_PATTERNS[kind] if isinstance(kind, str) else kind, **extra}


MASK_MOD = {"kind": "mask_mod", "function": "tests.masks:stripes"}


@pytest.mark.parametrize("kind", [*BS_PATTERNS, "mask_mod"])
@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("n", [1, 5, 37, 64])
def test_dynamic_block_sparse_op_equals_reference(n, is_causal, kind):
    """The block-sparse custom op, forward and backward (from out and lse), vs float64."""
    torch.manual_seed(n)
    q, k, v = (torch.randn(2, 3, n, 8, requires_grad=True) for _ in range(3))
    pattern = MASK_MOD if kind == "mask_mod" else BS_PATTERNS[kind]
    kw = {"block_size": BLOCK, "pattern": pattern, "is_causal": is_causal}
    out = dynamic_block_sparse_attention(q, k, v, **kw)
    _assert_matches_reference(out, (q, k, v), lambda *x: block_sparse_reference(*x, **kw), is_causal)


def test_dynamic_block_sparse_op_is_dense_below_min_seq_len():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 3, 30, 8, dtype=torch.float64) for _ in range(3))
    kw = {"block_size": BLOCK, "pattern": BS_PATTERNS["local_window"], "is_causal": True}
    out = dynamic_block_sparse_attention(q, k, v, min_seq_len=31, **kw)
    torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True))
    sparse = dynamic_block_sparse_attention(q, k, v, min_seq_len=30, **kw)
    torch.testing.assert_close(sparse, block_sparse_reference(q, k, v, **kw))


@pytest.mark.parametrize(
    "args",
    [({"kind": "global_local", "window": 1, "global_blocks": 1}, True, 0.3, 0),
     ({"kind": "dilated", "window": 0, "stride": 2}, False, 0.3, 0),
     ({"kind": "local_window", "window": 1}, True, 0.3, 20),
     ({"kind": "mask_mod", "function": "tests.masks:stripes"}, True, 0.3, 0)],
    ids=["global_local_causal", "dilated", "dense_below_min_seq_len", "mask_mod"],
)
def test_dynamic_block_sparse_ops_pass_opcheck(args):
    from dilated_compile.lowering.block_sparse.arguments import encode_parameters as encode_block_sparse

    pattern, *rest = args
    args = (encode_block_sparse(BLOCK, pattern), *rest)
    q, k, v = (torch.randn(2, 3, 19, 8, requires_grad=True) for _ in range(3))
    torch.library.opcheck(torch.ops.dilated_compile.block_sparse_attention.default, (q, k, v, *args))
    out, lse = torch.ops.dilated_compile.block_sparse_attention(q, k, v, *args)
    dout = torch.randn_like(out)
    torch.library.opcheck(
        torch.ops.dilated_compile.block_sparse_attention_backward.default,
        (dout, q.detach(), k.detach(), v.detach(), out.detach(), lse, *args),
    )


def _block_sparse_reference_model(model, kind):
    ref = copy.deepcopy(model)

    def attention(q, k, v, module):
        return block_sparse_reference(
            q, k, v, block_size=BLOCK, pattern=BS_PATTERNS[kind], is_causal=module.is_causal
        ).to(q.dtype)

    return ref, with_attention_replaced(ref, attention)


@pytest.mark.parametrize(  # each pattern kind, causality and dynamic mode meets each value of the others
    "dynamic,is_causal,kind",
    [(True, False, "local_window"), (None, True, "local_window"), (None, False, "global_local"),
     (True, True, "global_local")],
    ids=["dynamic_true-full-local_window", "automatic_dynamic-causal-local_window",
         "automatic_dynamic-full-global_local", "dynamic_true-causal-global_local"],
)
def test_block_sparse_lengths_train_like_reference_without_recompiles(dynamic, is_causal, kind):
    """As test_lengths_train_like_reference_without_recompiles, for block_sparse sites:
    SGD steps at lengths that are and are not multiples of the block size, loss and
    gradients equal the float64 reference step by step, no recompile after the
    length turned dynamic (dynamic=True: one graph for all)."""
    torch.manual_seed(0)
    model = TinyModel(heads=(5, 3), is_causal=is_causal)
    reference, saved = _block_sparse_reference_model(model, kind)
    pol = policy(_block_sparse_rule(kind))
    graphs_after = _train_over_lengths(model, reference, saved, pol, dynamic, BS_LENGTHS)
    assert not counters["graph_break"]
    assert graphs_after == ([1] * len(BS_LENGTHS) if dynamic else [1, 2, 2, 2, 2])
    sites = dilated_compile.reports()[-1].sites
    assert len(sites) == 2 and all(s.status == "rewritten" for s in sites)
    assert all(
        s.attention.startswith(f"block_sparse b={BLOCK} {kind}(")
        and s.attention.endswith("; dynamic length (custom op), dense below min_seq_len 0")
        for s in sites
    ), sites[0].attention


def test_block_sparse_dynamic_min_seq_len_is_decided_per_call():
    """Dense below min_seq_len, block-sparse from it, one graph."""
    torch.manual_seed(0)
    model = TinyModel(heads=(4,))
    ref = copy.deepcopy(model)

    def attention(q, k, v, module):
        if q.shape[2] < 40:
            return dense_reference(q, k, v, is_causal=True).to(q.dtype)
        pattern = BS_PATTERNS["dilated"]
        return block_sparse_reference(q, k, v, block_size=BLOCK, pattern=pattern, is_causal=True).to(q.dtype)

    saved = with_attention_replaced(ref, attention)
    pol = policy(_block_sparse_rule("dilated"), min_seq_len=40)
    compiled = torch.compile(model, backend="dilated", options={"policy": pol}, dynamic=True)
    try:
        with torch.no_grad():
            for n in (24, 39, 40, 61):
                x = torch.randn(1, n, 16)
                torch.testing.assert_close(compiled(x), ref(x), atol=1e-5, rtol=1e-5, msg=f"N={n}")
    finally:
        restore(saved)
    assert counters["stats"]["unique_graphs"] == 1


def test_block_sparse_mask_mod_site_with_dynamic_length_is_rewritten_and_trains_like_reference():
    """A mask_mod pattern's function travels to the custom op as its import path: with a
    symbolic length the site is rewritten (one graph), and every length's output and
    gradients equal the float64 reference's (so automatic dynamic shapes cannot turn the
    site into dense attention from the second length on)."""
    from tests.masks import stripes

    torch.manual_seed(0)
    model = TinyModel(heads=(2,))
    ref = copy.deepcopy(model)

    def attention(q, k, v, module):
        out = block_sparse_reference(q, k, v, block_size=BLOCK, pattern=stripes, is_causal=module.is_causal)
        return out.to(q.dtype)

    saved = with_attention_replaced(ref, attention)
    rule = _block_sparse_rule({"kind": "mask_mod", "function": "tests.masks:stripes"})
    compiled = torch.compile(model, backend="dilated", options={"policy": policy(rule)}, dynamic=True)
    try:
        for n in (24, 37):
            x = torch.randn(1, n, 16, requires_grad=True)
            y, y_ref = compiled(x), ref(x)
            torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5, msg=f"N={n}")
            g, g_ref = torch.autograd.grad(y.pow(2).sum(), x), torch.autograd.grad(y_ref.pow(2).sum(), x)
            torch.testing.assert_close(g, g_ref, atol=1e-4, rtol=1e-4, msg=f"N={n}")
    finally:
        restore(saved)
    assert counters["stats"]["unique_graphs"] == 1
    (site,) = dilated_compile.reports()[-1].sites
    assert site.status == "rewritten", site.reason
    assert "mask_mod(tests.masks:stripes)" in site.attention and "dynamic length (custom op)" in site.attention


class _ReentrantCheckpointedBlocks(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = TinyModel(heads=(4, 3))

    def forward(self, x):
        for layer in self.inner.layers:
            x = torch.utils.checkpoint.checkpoint(layer, x, use_reentrant=True)
        return x


def test_reentrant_checkpointing_rewrites_sites_and_matches_reference():
    """use_reentrant=True (HF's old default): the sites are rewritten too (no graph
    break), and the input and parameter gradients equal the float64 reference's."""
    torch.manual_seed(0)
    model = _ReentrantCheckpointedBlocks()
    reference, saved = _reference_model(model, "longnet")
    pol = policy(dilated_rule(match="**.attn", seg=SEG, rates=RATES, head_split="longnet"))
    compiled = torch.compile(model, backend="dilated", options={"policy": pol})
    x = torch.randn(2, 40, 16, requires_grad=True)
    try:
        loss_c, loss_r = compiled(x).pow(2).mean(), reference(x).pow(2).mean()
        loss_c.backward()
        loss_r.backward()
    finally:
        restore(saved)
    torch.testing.assert_close(loss_c, loss_r, atol=1e-5, rtol=1e-5)
    for (name, a), b in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-4, msg=name)
    assert counters["dilated"]["rewritten"] == 2 and counters["dilated"]["left"] == 0
    assert not counters["graph_break"]
