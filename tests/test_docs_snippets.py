"""Every Python snippet in README.md and docs/*.md runs as written.

Each ```python block is executed on its own in a fresh namespace, from the
repository root, on CPU. A block preceded (on the line before its opening
fence) by ``<!-- not run: REASON -->`` is not executed; the reason must say why.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```python\s*$")
NOT_RUN = re.compile(r"^<!--\s*not run:\s*(\S.*?)\s*-->\s*$")


def python_blocks(path: Path) -> list[tuple[int, str, str | None]]:
    """(line number, code, reason it is not run or None) of each ```python block of `path`."""
    lines = path.read_text().splitlines()
    blocks = []
    i = 0
    while i < len(lines):
        if FENCE.match(lines[i].strip()):
            start = i
            skip = NOT_RUN.match(lines[i - 1].strip()) if i > 0 else None
            i += 1
            body = []
            while i < len(lines) and lines[i].strip() != "```":
                body.append(lines[i])
                i += 1
            if i == len(lines):
                raise ValueError(f"{path.name}:{start + 1}: ```python block is not closed")
            indent = min((len(l) - len(l.lstrip()) for l in body if l.strip()), default=0)
            code = "\n".join(l[indent:] for l in body)
            blocks.append((start + 1, code, skip.group(1) if skip else None))
        i += 1
    return blocks


SNIPPETS = [
    pytest.param(path, line, code, reason, id=f"{path.relative_to(ROOT)}:{line}")
    for path in DOCUMENTS
    for line, code, reason in python_blocks(path)
]


def test_documents_have_snippets_and_few_are_skipped():
    assert len(SNIPPETS) >= 5, [d.name for d in DOCUMENTS]
    skipped = [p.id for p in SNIPPETS if p.values[3] is not None]
    assert len(skipped) <= len(SNIPPETS) // 3, skipped


def test_not_run_marker_is_recognised(tmp_path):
    fake = tmp_path / "doc.md"
    fake.write_text("x\n<!-- not run: needs several processes -->\n```python\nraise SystemExit\n```\n"
                    "\n```python\n  y = 1\n```\n")
    assert python_blocks(fake) == [(3, "raise SystemExit", "needs several processes"), (7, "y = 1", None)]


@pytest.mark.parametrize("path,line,code,reason", SNIPPETS)
def test_snippet_runs(path, line, code, reason, monkeypatch):
    if reason is not None:
        pytest.skip(f"not run: {reason}")
    monkeypatch.chdir(ROOT)
    monkeypatch.syspath_prepend(str(ROOT))
    torch._dynamo.reset()
    namespace = {"__name__": f"snippet_{path.stem}_{line}"}
    with warnings.catch_warnings():
        warnings.simplefilter("default")
        exec(compile(code, f"{path.relative_to(ROOT)}:{line}", "exec"), namespace)
