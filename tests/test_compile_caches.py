"""Caches of compiled code: a second process hits the FX graph and AOTAutograd caches and a
changed policy misses them, the cache key follows the policy's content and the lowering's
environment knobs; every module-level cache of the package is bounded, also when threads share
one compiled model."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import dilated_compile

from .models import dilated_rule, policy
from .training_common import ROOT, fresh_dynamo  # noqa: F401 (autouse fixture)


# ---------------------------------------------------------------- caches across processes

_CACHE_PROBE = textwrap.dedent(
    """
    import json, sys, torch
    from torch._dynamo.utils import counters
    from tests.models import TinyModel, dilated_rule, policy
    for segment in sys.argv[1:]:  # one compile per policy, in a fresh Dynamo state
        torch._dynamo.reset()
        counters.clear()
        torch.manual_seed(0)
        model = TinyModel(heads=(4,))
        pol = policy(dilated_rule(seg=(int(segment), 16), rates=(1, 2)))
        compiled = torch.compile(model, backend="dilated", options={"policy": pol})
        compiled(torch.randn(1, 24, 16)).sum().backward()
        print(json.dumps({"aot": dict(counters["aot_autograd"]), "inductor": dict(counters["inductor"]),
                          "rewritten": counters["dilated"]["rewritten"]}))
    """
)


def _probe_caches(cache_dir: Path, *segments: int) -> list[dict]:
    """The cache counters of compiling, in one new process, the model with each segment length."""
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache_dir)}
    env.pop("TORCHINDUCTOR_FORCE_DISABLE_CACHES", None)
    res = subprocess.run(
        [sys.executable, "-c", _CACHE_PROBE, *map(str, segments)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert res.returncode == 0, res.stderr[-4000:]
    import json

    return [json.loads(line) for line in res.stdout.strip().splitlines()[-len(segments):]]


@pytest.mark.inductor
def test_second_process_hits_caches_and_changed_policy_misses(tmp_path):
    """Process 1 compiles (misses, saves); process 2, same policy, hits the FX graph and
    AOTAutograd caches, and then, a changed policy, misses both."""
    (first,) = _probe_caches(tmp_path, 8)
    assert first["rewritten"] == 1
    assert first["aot"].get("autograd_cache_miss") == 1 and first["aot"].get("autograd_cache_saved") == 1
    assert first["inductor"].get("fxgraph_cache_miss", 0) >= 2 and not first["inductor"].get("fxgraph_cache_hit")

    second, changed = _probe_caches(tmp_path, 8, 4)
    assert second["rewritten"] == 1
    assert second["aot"].get("autograd_cache_hit") == 1, second
    assert not second["aot"].get("autograd_cache_miss") and not second["aot"].get("autograd_cache_bypass")

    assert changed["rewritten"] == 1
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

    from dilated_compile.lowering.dilated import op as dilated_op, plan as dilated_lowering
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
    dilated_op._ROUTES.clear()
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
    assert 0 < len(dilated_op._ROUTES) <= dilated_op._ROUTES_MAX == 256, len(dilated_op._ROUTES)
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    print("threads ok")
    """
)


def test_threads_share_one_dynamic_model_and_caches_stay_bounded():
    """8 threads call one compiled model (symbolic length) at their own lengths: every
    result equals the single-threaded one, nothing recompiles, and the plan caches,
    filled concurrently at run time by the custom op, stay within their bounds.

    In a process of its own: on torch 2.11 Dynamo compiling in threads leaves dynamic-shape
    state that `torch._dynamo.reset()` does not clear, and later tests' compile counts change."""
    res = subprocess.run(
        [sys.executable, "-c", _THREADS_PROBE], cwd=ROOT, capture_output=True, text=True, timeout=900,
    )
    assert res.returncode == 0 and "threads ok" in res.stdout, res.stderr[-4000:]
