"""The end-to-end training benchmark's --quick mode runs, measures and plots.

`benchmarks/bench_gpt_train.py --quick` trains a tiny GPT on CPU with every
backend at lengths 256 and 512 in a subprocess; the JSON must hold every
configuration with positive tokens/s, compile times for the compiled
backends, the dilated policy rewriting the site at 512 and leaving it at 256
(min_seq_len), and each compiled backend's first loss equal to an eager
single-process run of the attention it claims to compute. The plot script
then draws the PNG and prints the tables. The same for --ring under torchrun
(two gloo processes, one length).
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
TIMEOUT_S = 480  # the quick run takes under a minute on an idle 2-core machine; CI machines are shared


def _env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))


def _run(cmd: list[str], cwd: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=TIMEOUT_S)
    if proc.returncode:
        pytest.fail(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


@pytest.fixture(scope="module")
def quick(tmp_path_factory) -> tuple[str, dict]:
    out = str(tmp_path_factory.mktemp("bench_quick"))
    _run([sys.executable, BENCH, "--quick", "--out", out], cwd=REPO)
    with open(os.path.join(out, "gpt_train.json")) as f:
        return out, json.load(f)


@pytest.fixture(scope="module")
def quick_ring(tmp_path_factory) -> tuple[str, dict]:
    out = str(tmp_path_factory.mktemp("bench_quick_ring"))
    _run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         BENCH, "--quick", "--ring", "--lengths", "256", "--out", out],
        cwd=REPO,
    )
    with open(os.path.join(out, "gpt_train_ring.json")) as f:
        return out, json.load(f)


def _rows(results: dict) -> dict[tuple[str, int], dict]:
    return {(r["backend"], r["length"]): r for r in results["runs"]}


def _check_measurements(row: dict, compiled: bool) -> None:
    where = f"{row['backend']} at {row['length']}"
    assert row["status"] == "ok", f"{where}: {row.get('reason')}"
    assert row["tokens_per_s"] > 0 and math.isfinite(row["tokens_per_s"]), where
    assert len(row["step_ms"]) >= 1 and all(t > 0 for t in row["step_ms"]), where
    assert row["tokens_per_s"] == pytest.approx(row["length"] / (row["step_ms_median"] / 1e3)), where
    assert all(math.isfinite(x) for x in row["losses"]), where
    if compiled:
        assert row["cold_compile_s"] > 0, where
        assert row["warm_compile_s"] >= 0, where


def _check_first_loss(row: dict) -> None:
    """The first step's loss is the eager single-process model's loss with the same attention."""
    first, ref = row["losses"][0], row["reference_first_loss"]
    assert first == pytest.approx(ref, rel=2e-5), f"{row['backend']} at {row['length']}: {first} vs eager {ref}"


def test_quick_has_every_configuration(quick):
    _, results = quick
    rows = _rows(results)
    assert results["meta"]["lengths"] == [256, 512]
    backends = ("inductor", "dilated", "dilated_groups", "seed")
    assert set(rows) == {(b, n) for b in backends for n in (256, 512)}
    for (backend, _n), row in rows.items():
        _check_measurements(row, compiled=backend != "seed")
    assert results["summary"]["dilated"]["max_length"] == 512
    assert results["summary"]["dilated_groups"]["max_length"] == 512
    for key in ("device", "torch", "triton", "git_commit"):
        assert key in results["meta"]


def test_quick_losses_match_eager_attention(quick):
    _, results = quick
    for (backend, _n), row in _rows(results).items():
        if backend != "seed":
            _check_first_loss(row)


def test_quick_policy_rewrites_only_long_contexts(quick):
    out, results = quick
    rows = _rows(results)
    long_sites, short_sites = rows[("dilated", 512)]["sites"], rows[("dilated", 256)]["sites"]
    assert long_sites and all(s["status"] == "rewritten" and "dilated longnet" in s["attention"] for s in long_sites)
    assert short_sites and all(s["status"] == "left" and "min_seq_len" in s["reason"] for s in short_sites)
    with open(os.path.join(out, "policy_dilated_512.json")) as f:
        policy = json.load(f)
    rule = policy["rules"][0]
    # LongNet's segments scaled to the quick lengths, clipped at the context: the last one is 512
    assert rule["segment_lengths"] == [64, 128, 256, 512] and rule["dilation_rates"] == [1, 2, 4, 6]
    assert rule["head_split"] == "longnet"
    groups_sites = rows[("dilated_groups", 512)]["sites"]
    assert groups_sites and all("dilated groups" in s["attention"] for s in groups_sites)
    with open(os.path.join(out, "policy_dilated_groups_512.json")) as f:
        assert json.load(f)["rules"][0]["head_split"] == "groups"


def test_plot_script_draws_and_tabulates(quick):
    out, _ = quick
    path = os.path.join(out, "gpt_train.json")
    try:
        import matplotlib  # noqa: F401

        plot_args = []
    except ImportError:  # the tables still print; the PNG needs matplotlib (the "bench" extra)
        plot_args = ["--no-plot"]
    proc = _run([sys.executable, PLOT, path, *plot_args], cwd=REPO)
    assert "| 512 | dilated |" in proc.stdout
    assert "| dilated / inductor tokens/s at 512 |" in proc.stdout
    assert "| dilated / seed tokens/s at 512 |" in proc.stdout
    assert "not measured" not in proc.stdout.split("| target |")[1].split("longest context")[0]
    if not plot_args:
        png = os.path.join(out, "gpt_train.png")
        assert os.path.getsize(png) > 10_000


def test_quick_ring_under_torchrun(quick_ring):
    _, results = quick_ring
    assert results["meta"]["mode"] == "ring" and results["meta"]["world_size"] == 2
    rows = _rows(results)
    assert set(rows) == {("ring_dense", 256), ("ring_dilated", 256)}
    for row in rows.values():
        _check_measurements(row, compiled=True)
        _check_first_loss(row)
        assert [r["status"] for r in row["ranks"]] == ["ok", "ok"]
        assert row["sites"] and all(s["status"] == "rewritten" for s in row["sites"])
