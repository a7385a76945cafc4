"""Debug output of the pass: a folder per compiled graph, and structured-trace entries.

The folder (option ``debug_dir`` or environment variable ``DILATED_DEBUG_DIR``)
gets one sub-folder per compiled graph with the graph before and after the
rewrite as readable Python, their unified diff and the site report. The same
report and diff go to torch's structured trace, where ``tlparse`` shows them
beside Inductor's artifacts.
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path

from torch._logging import trace_structured

from .passes.report import GraphReport

DEBUG_DIR_ENV = "DILATED_DEBUG_DIR"
_counter = itertools.count()


def debug_dir_from(options: dict) -> str | None:
    """The debug folder the options or the environment name, if any."""
    return options.get("debug_dir") or os.environ.get(DEBUG_DIR_ENV) or None


def write_graph_files(report: GraphReport, folder: str | os.PathLike) -> Path:
    """Write before.py, after.py, diff.patch and report.txt into `folder`; return it."""
    path = Path(folder)
    path.mkdir(parents=True, exist_ok=True)
    (path / "before.py").write_text(report.before)
    (path / "after.py").write_text(report.after)
    (path / "diff.patch").write_text(report.diff)
    text = str(report)
    if report.warnings:
        text += "\n" + "\n".join(f"warning: {w}" for w in report.warnings)
    (path / "report.txt").write_text(text + "\n")
    return path


def write_debug_dir(report: GraphReport, root: str | os.PathLike) -> Path:
    """A new `graph_NNN` sub-folder of `root` with the files of one graph."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    while True:
        folder = root / f"graph_{next(_counter):03d}"
        if not folder.exists():
            return write_graph_files(report, folder)


def trace_report(report: GraphReport) -> None:
    """Put the report table and the graph diff into torch's structured trace."""
    for name, payload in (("dilated_compile_report", str(report)), ("dilated_compile_diff", report.diff)):
        trace_structured(
            "artifact",
            metadata_fn=lambda name=name: {"name": name, "encoding": "string"},
            payload_fn=lambda payload=payload: payload,
        )
