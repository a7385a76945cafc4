"""The end-to-end training benchmark's --quick mode runs, measures and plots.

`benchmarks/bench_gpt_train.py --quick` trains a tiny GPT on CPU with every
backend at lengths 64 and 128 in a subprocess; the JSON must hold every
configuration with the fields of a full run's rows, positive tokens/s,
compile times for the compiled backends (the warm one at the first length),
the dilated policy rewriting the site at 128 and leaving it at 64
(min_seq_len), and each compiled backend's first loss equal to an eager
single-process run of the attention it claims to compute. The plot script
then draws the PNG and prints the tables. The same for --ring under torchrun
(two gloo processes, one length). Both runs share one empty Inductor cache.
Here no row runs Inductor: the dense ``inductor`` rows compile with
``--dense-compiler eager`` and the ``backend="dilated"`` rows run their
rewritten graphs as captured (``DILATED_COMPILER=eager``), both recorded in
the JSON's meta; the tests check the harness, and what Inductor builds from a
rewritten model is tested by the tests marked ``inductor``. A run of the
benchmark outside the tests compiles every row with Inductor.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(REPO, "benchmarks", "bench_gpt_train.py")
PLOT = os.path.join(REPO, "benchmarks", "plot_gpt_train.py")
TIMEOUT_S = 480  # each quick run takes about a minute of CPU; a shared machine can stretch that several times
LENGTHS = [64, 128]  # --quick's lengths: the policy's min_seq_len is 128
RING_LENGTH = 128
# the fields of every row a full run writes (warm_first_step_s where the warm compile is measured,
# reference_first_loss with --check-loss, ranks with --ring)
ROW_FIELDS = {
    "backend", "length", "policy", "status", "first_step_s", "step_ms", "step_ms_median", "tokens_per_s",
    "peak_mem_gib", "cold_compile_s", "warm_compile_s", "sites", "losses", "config_wall_s",
}


@pytest.fixture(scope="module")
def inductor_cache(tmp_path_factory) -> str:
    """One empty Inductor cache for both runs (the suite's own cache stays untouched)."""
    return str(tmp_path_factory.mktemp("bench_quick_inductor_cache"))


DILATED_COMPILER = "eager"  # the backend="dilated" rows' compiler in these runs
DENSE_COMPILER = "eager"  # the dense rows' torch.compile backend


def _env(cache: str | None = None) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
               DILATED_COMPILER=DILATED_COMPILER)
    if cache is not None:
        env["TORCHINDUCTOR_CACHE_DIR"] = cache
    return env


def _run(cmd: list[str], cwd: str, cache: str | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=_env(cache), capture_output=True, text=True, timeout=TIMEOUT_S)
    if proc.returncode:
        pytest.fail(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


@pytest.fixture(scope="module")
def quick(tmp_path_factory, inductor_cache) -> tuple[str, dict]:
    out = str(tmp_path_factory.mktemp("bench_quick"))
    _run([sys.executable, BENCH, "--quick", "--dense-compiler", DENSE_COMPILER, "--out", out], cwd=REPO,
         cache=inductor_cache)
    with open(os.path.join(out, "gpt_train.json")) as f:
        return out, json.load(f)


@pytest.fixture(scope="module")
def quick_ring(tmp_path_factory, inductor_cache) -> tuple[str, dict]:
    out = str(tmp_path_factory.mktemp("bench_quick_ring"))
    _run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         BENCH, "--quick", "--ring", "--out", out],
        cwd=REPO, cache=inductor_cache,
    )
    with open(os.path.join(out, "gpt_train_ring.json")) as f:
        return out, json.load(f)


def _rows(results: dict) -> dict[tuple[str, int], dict]:
    return {(r["backend"], r["length"]): r for r in results["runs"]}


def _check_measurements(row: dict, compiled: bool, warm_measured: bool) -> None:
    where = f"{row['backend']} at {row['length']}"
    assert row["status"] == "ok", f"{where}: {row.get('reason')}"
    assert ROW_FIELDS <= set(row), f"{where}: no {sorted(ROW_FIELDS - set(row))}"
    assert row["tokens_per_s"] > 0 and math.isfinite(row["tokens_per_s"]), where
    assert len(row["step_ms"]) >= 1 and all(t > 0 for t in row["step_ms"]), where
    assert row["tokens_per_s"] == pytest.approx(row["length"] / (row["step_ms_median"] / 1e3)), where
    assert all(math.isfinite(x) for x in row["losses"]), where
    assert row["peak_mem_gib"] is None, where  # CPU
    if compiled:
        assert row["cold_compile_s"] > 0, where
        assert row["policy"] is None or row["policy"]["rules"], where
    else:
        assert row["cold_compile_s"] == 0.0 and row["warm_compile_s"] == 0.0, where
    if compiled and warm_measured:  # Dynamo reset, the same disk caches: the first step again
        assert row["warm_compile_s"] >= 0 and row["warm_first_step_s"] > 0, where
    elif compiled:
        assert row["warm_compile_s"] is None and "warm_first_step_s" not in row, where


def _check_first_loss(row: dict) -> None:
    """The first step's loss is the eager single-process model's loss with the same attention."""
    first, ref = row["losses"][0], row["reference_first_loss"]
    assert first == pytest.approx(ref, rel=2e-5), f"{row['backend']} at {row['length']}: {first} vs eager {ref}"


def test_quick_has_every_configuration(quick):
    _, results = quick
    rows = _rows(results)
    meta = results["meta"]
    assert meta["lengths"] == LENGTHS and meta["warm_compile_lengths"] == LENGTHS[:1]
    backends = ("inductor", "dilated", "dilated_groups", "seed")
    assert set(rows) == {(b, n) for b in backends for n in LENGTHS}
    assert [(r["length"], r["backend"]) for r in results["runs"]] == [(n, b) for n in LENGTHS for b in backends]
    for (backend, n), row in rows.items():
        _check_measurements(row, compiled=backend != "seed", warm_measured=n == LENGTHS[0])
    for backend in backends:
        assert results["summary"][backend] == {
            "max_length": LENGTHS[-1], "limited_by": "nothing longer was tried", "first_failure": None,
        }
    for key in ("device", "torch", "triton", "git_commit"):
        assert key in meta
    assert meta["quick"] and not meta["fresh_caches_per_configuration"]
    assert meta["dilated_compiler"] == DILATED_COMPILER and meta["dense_compiler"] == DENSE_COMPILER
    assert meta["model"]["params"] > 0 and meta["target_lengths"] == {"long": LENGTHS[1], "short": LENGTHS[0]}


def test_quick_losses_match_eager_attention(quick):
    _, results = quick
    for (backend, _n), row in _rows(results).items():
        if backend != "seed":
            _check_first_loss(row)


def test_quick_policy_rewrites_only_long_contexts(quick):
    out, results = quick
    rows = _rows(results)
    long_sites, short_sites = rows[("dilated", 128)]["sites"], rows[("dilated", 64)]["sites"]
    assert long_sites and all(s["status"] == "rewritten" and "dilated longnet" in s["attention"] for s in long_sites)
    assert short_sites and all(s["status"] == "left" and "min_seq_len" in s["reason"] for s in short_sites)
    with open(os.path.join(out, "policy_dilated_128.json")) as f:
        policy = json.load(f)
    assert policy == rows[("dilated", 128)]["policy"]
    rule = policy["rules"][0]
    # LongNet's segments scaled to the quick lengths, clipped at the context: the last one is 128
    assert rule["segment_lengths"] == [32, 64, 128] and rule["dilation_rates"] == [1, 2, 4]
    assert rule["head_split"] == "longnet" and policy["defaults"]["min_seq_len"] == 128
    groups_sites = rows[("dilated_groups", 128)]["sites"]
    assert groups_sites and all("dilated groups" in s["attention"] for s in groups_sites)
    with open(os.path.join(out, "policy_dilated_groups_128.json")) as f:
        assert json.load(f)["rules"][0]["head_split"] == "groups"
    for n in LENGTHS:  # inductor compiles dense attention and reports no site
        assert rows[("inductor", n)]["policy"] is None and rows[("inductor", n)]["sites"] == []


def test_plot_script_draws_and_tabulates(quick):
    out, _ = quick
    path = os.path.join(out, "gpt_train.json")
    try:
        import matplotlib  # noqa: F401

        plot_args = []
    except ImportError:  # the tables still print; the PNG needs matplotlib (the "bench" extra)
        plot_args = ["--no-plot"]
    proc = _run([sys.executable, PLOT, path, *plot_args], cwd=REPO)
    assert "| 128 | dilated |" in proc.stdout
    assert "| dilated / inductor tokens/s at 128 |" in proc.stdout
    assert "| dilated / seed tokens/s at 128 |" in proc.stdout
    assert "not measured" not in proc.stdout.split("| target |")[1].split("longest context")[0]
    if not plot_args:
        png = os.path.join(out, "gpt_train.png")
        assert os.path.getsize(png) > 10_000


def test_no_attention_backend_runs_the_model_without_attention(tmp_path, inductor_cache):
    """``no_attention`` (run only when named) trains the model with v in place of attention's
    output: its first loss is the eager model's with that replacement, unlike inductor's; the
    plot script tabulates the bound it sets."""
    out = str(tmp_path)
    _run([sys.executable, BENCH, "--quick", "--dense-compiler", DENSE_COMPILER, "--out", out, "--lengths", "64",
          "--backends", "inductor,dilated,no_attention", "--check-loss", "--profile-first-step"],
         cwd=REPO, cache=inductor_cache)
    with open(os.path.join(out, "gpt_train.json")) as f:
        results = json.load(f)
    rows = _rows(results)
    assert results["meta"]["profile_first_step"] is True
    for row in rows.values():  # --profile-first-step: where each cold first step's host time went
        profile = row["first_step_profile"]
        step = [e for e in profile["by_cumulative"] if e["function"].startswith("benchmarks/gpt_train_measure.py")
                and e["function"].endswith("(step)")]
        assert len(step) == 1 and step[0]["calls"] == 1, profile["by_cumulative"][:5]
        assert 0 < step[0]["cumulative_s"] <= row["first_step_s"]
        assert len(profile["by_own"]) == 40 and profile["by_own"][0]["own_s"] >= profile["by_own"][-1]["own_s"]
    free, dense = rows[("no_attention", 64)], rows[("inductor", 64)]
    _check_measurements(free, compiled=True, warm_measured=True)
    _check_first_loss(free)
    assert free["policy"] is None and free["sites"] == []
    assert free["losses"][0] != pytest.approx(dense["losses"][0], rel=1e-4)
    proc = _run([sys.executable, PLOT, os.path.join(out, "gpt_train.json"), "--no-plot"], cwd=REPO)
    table = proc.stdout.split("| context | inductor step (ms) | step without attention (ms) | bound |")[1]
    header, _, row = table.splitlines()[:3]
    assert header == " dilated speed-up | dilated: share of attention time removed |"
    bound = dense["step_ms_median"] / free["step_ms_median"]
    assert row.startswith("| 64 |") and f"| {bound:.2f} |" in row


def test_quick_ring_under_torchrun(quick_ring):
    _, results = quick_ring
    assert results["meta"]["mode"] == "ring" and results["meta"]["world_size"] == 2
    assert results["meta"]["lengths"] == [RING_LENGTH]
    assert results["meta"]["dilated_compiler"] == DILATED_COMPILER
    rows = _rows(results)
    assert set(rows) == {("ring_dense", RING_LENGTH), ("ring_dilated", RING_LENGTH)}
    for row in rows.values():
        _check_measurements(row, compiled=True, warm_measured=True)
        _check_first_loss(row)
        assert [r["status"] for r in row["ranks"]] == ["ok", "ok"]
        # the row's step is its slowest rank's
        assert row["step_ms_median"] == max(r["step_ms_median"] for r in row["ranks"])
        assert row["sites"] and all(s["status"] == "rewritten" for s in row["sites"])
        assert all("ring" in s["attention"] for s in row["sites"]), row["sites"]
