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
    write_drawings(report, path)
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


def to_dot(graph) -> str:
    """Graphviz DOT text of a drawing graph (attention nodes filled)."""
    lines = ["digraph attention {", '  node [shape=box, fontname="monospace", fontsize=10];']
    for name, attrs in graph.nodes(data=True):
        label = attrs.get("label", name).replace('"', "'").replace("\n", "\\n")
        style = ', style=filled, fillcolor="#ffd27f"' if attrs.get("attention") else ""
        lines.append(f'  "{name}" [label="{label}"{style}];')
    for a, b in graph.edges():
        lines.append(f'  "{a}" -> "{b}";')
    lines.append("}")
    return "\n".join(lines) + "\n"


def to_svg(graph, box_w: int = 260, box_h: int = 54, gap_x: int = 30, gap_y: int = 40) -> str:
    """A layered SVG drawing of a drawing graph (rows in topological order)."""
    from xml.sax.saxutils import escape

    import networkx as nx

    pos, width, top = {}, box_w + 2 * gap_x, gap_y
    components = sorted(nx.weakly_connected_components(graph), key=lambda c: min(c))
    for component in components:  # one block of rows per attention site
        layers = [sorted(layer) for layer in nx.topological_generations(graph.subgraph(component))]
        width = max(width, max(len(layer) for layer in layers) * (box_w + gap_x) + gap_x)
        for row, layer in enumerate(layers):
            for col, name in enumerate(layer):
                pos[name] = (gap_x + col * (box_w + gap_x), top + row * (box_h + gap_y))
        top += len(layers) * (box_h + gap_y) + gap_y
    height = top
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
        'font-family="monospace" font-size="11">',
        '<defs><marker id="arrow" markerWidth="8" markerHeight="8" refX="8" refY="4" orient="auto">'
        '<path d="M0,0 L8,4 L0,8 z" fill="#555"/></marker></defs>',
    ]
    for a, b in graph.edges():
        (x1, y1), (x2, y2) = pos[a], pos[b]
        out.append(
            f'<line x1="{x1 + box_w / 2:.0f}" y1="{y1 + box_h:.0f}" x2="{x2 + box_w / 2:.0f}" '
            f'y2="{y2:.0f}" stroke="#555" marker-end="url(#arrow)"/>'
        )
    for name, attrs in graph.nodes(data=True):
        x, y = pos[name]
        fill = "#ffd27f" if attrs.get("attention") else "#eef3fb"
        out.append(f'<rect x="{x:.0f}" y="{y:.0f}" width="{box_w}" height="{box_h}" rx="4" '
                   f'fill="{fill}" stroke="#335"/>')
        for i, text in enumerate(attrs.get("label", name).split("\n")[:3]):
            out.append(f'<text x="{x + 6:.0f}" y="{y + 15 + 15 * i:.0f}">{escape(text[:40])}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def write_drawings(report: GraphReport, folder: str | os.PathLike) -> None:
    """attention_before/after .dot and .svg into `folder`."""
    path = Path(folder)
    for which, graph in (("before", report.drawing_before), ("after", report.drawing_after)):
        if graph is None:
            continue
        (path / f"attention_{which}.dot").write_text(to_dot(graph))
        (path / f"attention_{which}.svg").write_text(to_svg(graph))
