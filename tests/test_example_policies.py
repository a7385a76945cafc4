"""The example policies rewrite every attention site of the example model; the
example and benchmark plotting scripts run."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import dilated_compile

ROOT = Path(__file__).resolve().parents[1]
POLICIES = sorted((ROOT / "examples" / "policies").glob("*.yaml"))
BLOCK_SPARSE_JSON = ROOT / "benchmarks" / "results" / "block_sparse_h200_torch2.11_current.json"


def _is_ring(path: Path) -> bool:
    """Whether any rule of the policy file has a `ring:` key (tested elsewhere)."""
    doc = yaml.safe_load(path.read_text())
    return any("ring" in rule for rule in doc.get("rules", []))


def _example_module():
    """examples/gpt_example.py, imported from its file."""
    spec = importlib.util.spec_from_file_location("gpt_example_for_policies", ROOT / "examples" / "gpt_example.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_policies_found() -> None:
    names = {p.name for p in POLICIES}
    assert {"gpt_block_sparse.yaml", "gpt_global_local.yaml", "gpt_mask_mod.yaml"} <= names


@pytest.mark.parametrize("path", POLICIES, ids=[p.stem for p in POLICIES])
def test_example_policy_rewrites_every_site(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if _is_ring(path):
        pytest.skip("ring policies are tested with the ring example")
    monkeypatch.syspath_prepend(str(ROOT))  # mask_mod functions are named "examples.masks:..."
    monkeypatch.chdir(ROOT)
    policy = dilated_compile.load_policy(str(path))
    seq_len = max([512] + [rule.min_seq_len for rule in policy.rules])
    example = _example_module()
    torch.manual_seed(0)
    model = example.make_model().eval()
    assert seq_len <= model.block_size
    idx = torch.randint(0, 256, (1, seq_len))
    report = dilated_compile.explain(model, idx, policy=policy)
    attn_modules = {name for name, m in model.named_modules() if isinstance(m, example.CausalSelfAttention)}
    assert {s.module for s in report.sites} == attn_modules, str(report)
    assert all(s.status == "rewritten" and s.reason is None for s in report.sites), str(report)
    kinds = {rule.attention for rule in policy.rules}
    if kinds == {"block_sparse"}:
        assert all(s.attention.startswith("block_sparse") for s in report.sites), str(report)


def test_mask_mod_policy_names_the_example_mask(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(ROOT))
    policy = dilated_compile.load_policy(str(ROOT / "examples" / "policies" / "gpt_mask_mod.yaml"))
    (rule,) = policy.rules
    assert rule.block_sparse.pattern.kind == "mask_mod"
    from examples.masks import SINK, WINDOW, sliding_window_with_sink

    q, kv = torch.tensor(1000), torch.arange(1024)
    allowed = sliding_window_with_sink(torch.tensor(0), torch.tensor(0), q, kv)
    expected = ((q - kv).abs() <= WINDOW) | (kv < SINK)
    assert torch.equal(allowed, expected)


def test_draw_patterns_script(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    # a length that is not a multiple of the 128-token tile, blocks smaller than a tile
    res = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "draw_patterns.py"), "--out", str(tmp_path),
         "--seq-len", "1000", "--block-size", "64"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["dilated.png", "global_local.png", "local_window.png", "mask_mod.png"]
    assert all((tmp_path / n).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for n in names)


def test_plot_block_sparse_script(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    res = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "plot_block_sparse.py"), str(BLOCK_SPARSE_JSON),
         "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    stem = BLOCK_SPARSE_JSON.stem
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{stem}.png", f"{stem}_ratio.png"]
    rows = [line for line in res.stdout.splitlines() if line.startswith("| 32k |")]
    assert len(rows) == 12


# Run as a user would, from another folder, with numpy unimportable: torch runs without numpy,
# and so must the package (a block-sparse site once needed it to make its tile classes constant).
WITHOUT_NUMPY = (
    "import runpy, sys; sys.modules['numpy'] = None; sys.argv = sys.argv[1:]; "
    "runpy.run_path(sys.argv[0], run_name='__main__')"
)


@pytest.mark.parametrize("name", ["gpt_block_sparse", "gpt_mask_mod"])  # built-in, and a mask_mod
def test_example_checks_block_sparse_policies_against_their_reference(name: str, tmp_path: Path) -> None:
    """The example's own check (compiled logits against the float64 model with each site's
    reference attention) passes for the block-sparse policies, without numpy."""
    res = subprocess.run(
        [sys.executable, "-c", WITHOUT_NUMPY, str(ROOT / "examples" / "gpt_example.py"),
         "--policy", str(ROOT / "examples" / "policies" / f"{name}.yaml"),
         "--seq-len", "512", "--batch", "1"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )
    assert res.returncode == 0, (res.stdout[-2000:], res.stderr[-3000:])
    assert " OK" in res.stdout and "block_sparse" in res.stdout, res.stdout[-2000:]
