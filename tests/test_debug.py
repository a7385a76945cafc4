"""Seeing what the backend did: command line, debug folder, TORCH_LOGS, structured trace."""

import os
import shutil
import subprocess
import xml.etree.ElementTree as ET
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from .models import TinyModel, dilated_rule, policy

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "gpt_example.py"
LONGNET = ROOT / "examples" / "policies" / "gpt_longnet.yaml"


def _run(args, env=None, timeout=300):
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout,
                          env=full_env, cwd=ROOT)


def test_explain_command_line(tmp_path):
    res = _run(["-m", "dilated_compile", "explain", f"{EXAMPLE}:make_model", "--policy", str(LONGNET),
                "--seq-len", "512", "--batch", "2", "--out", str(tmp_path)])
    assert res.returncode == 0, res.stderr[-2000:]
    table = res.stdout.split("cost model")[0]
    rows = {line.split()[0]: line for line in table.splitlines() if line.startswith("blocks.")}
    assert set(rows) == {f"blocks.{i}.attn" for i in range(4)}
    assert "dense (unchanged)" in rows["blocks.0.attn"]
    assert all("rewritten  dilated longnet" in rows[f"blocks.{i}.attn"] for i in (1, 2, 3))
    cost_rows = {l.split()[0]: l.split() for l in res.stdout.split("cost model")[1].splitlines()[2:6]}
    assert float(cost_rows["blocks.0.attn"][-1]) == 1.0  # dense, unchanged
    assert all(0 < float(cost_rows[f"blocks.{i}.attn"][-1]) < 0.5 for i in (1, 2, 3))
    diff_removed = [l for l in res.stdout.splitlines() if l.startswith("-") and "scaled_dot_product_attention(" in l]
    diff_added = [l for l in res.stdout.splitlines() if l.startswith("+") and "dilated_attention(" in l]
    assert len(diff_removed) == 3 and len(diff_added) == 3
    (graph,) = tmp_path.iterdir()
    assert sorted(p.name for p in graph.iterdir()) == [
        "after.py", "attention_after.dot", "attention_after.svg", "attention_before.dot",
        "attention_before.svg", "before.py", "diff.patch", "report.txt"]
    assert "dilated_compile_lowering_dilated_attention_dilated_attention" in (graph / "after.py").read_text()
    assert "blocks.3.attn" in (graph / "report.txt").read_text()
    for which in ("before", "after"):
        svg = ET.parse(graph / f"attention_{which}.svg").getroot()
        assert svg.tag.endswith("svg") and len(svg.findall("{http://www.w3.org/2000/svg}rect")) > 4
    before = (graph / "attention_before.dot").read_text()
    after = (graph / "attention_after.dot").read_text()
    assert before.count("fillcolor") == 4 and "scaled_dot_product_attention" in before
    assert after.count("fillcolor") == 4 and after.count("\\ndilated_attention\\n") == 3


def test_explain_command_line_errors():
    res = _run(["-m", "dilated_compile", "explain", f"{EXAMPLE}:nope", "--policy", str(LONGNET),
                "--seq-len", "64"])
    assert res.returncode != 0 and "has no 'nope'" in res.stderr
    res = _run(["-m", "dilated_compile", "explain", "--help"])
    assert res.returncode == 0 and "--seq-len" in res.stdout and "--out" in res.stdout


def test_debug_dir_option(tmp_path):
    torch._dynamo.reset()
    torch.compile(TinyModel(), backend="dilated",
                  options={"policy": policy(dilated_rule()), "debug_dir": str(tmp_path)})(torch.randn(1, 20, 16))
    (graph,) = tmp_path.iterdir()
    assert (graph / "diff.patch").read_text().count("+        dilated_attention") == 2
    assert "layers.1.attn" in (graph / "report.txt").read_text()


SCRIPT = textwrap.dedent(
    """
    import torch, torch.nn.functional as F
    def f(q):
        return F.scaled_dot_product_attention(q, q, q, is_causal=True)
    pol = {"version": 1, "rules": [{"match": "**", "attention": "dilated",
           "segment_lengths": [4], "dilation_rates": [2]}]}
    torch.compile(f, backend="dilated", options={"policy": pol})(torch.randn(1, 2, 8, 4))
    """
)


def test_torch_logs_shows_the_table():
    res = _run(["-c", SCRIPT], env={"TORCH_LOGS": "dilated_compile"})
    assert res.returncode == 0, res.stderr[-2000:]
    assert "dilated_compile sites" in res.stderr and "rewritten  dilated groups" in res.stderr


def test_structured_trace_has_report_and_diff(tmp_path):
    res = _run(["-c", SCRIPT], env={"TORCH_TRACE": str(tmp_path)})
    assert res.returncode == 0, res.stderr[-2000:]
    text = "".join(p.read_text() for p in tmp_path.glob("*.log"))
    assert '"name": "dilated_compile_report"' in text and '"name": "dilated_compile_diff"' in text


@pytest.mark.skipif(shutil.which("tlparse") is None, reason="tlparse not installed (test extra)")
def test_tlparse_shows_our_entries(tmp_path):
    trace, out = tmp_path / "trace", tmp_path / "tl"
    res = _run(["-c", SCRIPT], env={"TORCH_TRACE": str(trace)})
    assert res.returncode == 0, res.stderr[-2000:]
    (log,) = trace.glob("*.log")
    res = subprocess.run(["tlparse", str(log), "-o", str(out), "--no-browser"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    index = (out / "index.html").read_text()
    assert "dilated_compile_report" in index and "dilated_compile_diff" in index
