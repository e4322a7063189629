"""The report as one self-contained HTML page: summary, sortable layer table, discrepancy
plot with the selection threshold, and the layer graph. ``Report.save_html(path)`` writes it.

Everything is inline (CSS, a few lines of JS, the plot as a base64 PNG, the graph as SVG), so
the file can be mailed or attached to a CI run and opens offline.
"""
from __future__ import annotations

import base64
import io
from html import escape
from pathlib import Path
from typing import TYPE_CHECKING

from ..meta import bits_label
from .dump.drawing import SELECTED, UNSELECTED, layer_drawing
from .dump.svg import render_svg
from .selection_words import selection_words

if TYPE_CHECKING:  # report imports this module to write its page
    from .report import Report

_STYLE = """
body { font-family: Helvetica, Arial, sans-serif; margin: 24px; color: #222; }
h1 { font-size: 22px; } h2 { font-size: 17px; margin-top: 28px; }
table { border-collapse: collapse; font-size: 13px; }
th, td { padding: 3px 10px; border-bottom: 1px solid #ddd; text-align: right; }
th { cursor: pointer; background: #f3f3f3; user-select: none; }
th:hover { background: #e3e3e3; }
td.name, td.kind { text-align: left; font-family: monospace; }
th:nth-child(2), th:nth-child(3) { text-align: left; }
tr.selected td { background: #eaf6ec; }
dl { display: grid; grid-template-columns: max-content auto; gap: 3px 14px; font-size: 14px; }
dt { color: #666; } .note { color: #a33; }
.graph svg { max-width: 100%; height: auto; }
"""

# Click a header to sort by it; again to reverse. Cells sort by data-v (numbers) or text.
_SCRIPT = """
document.querySelectorAll('th').forEach((th, column) => th.addEventListener('click', () => {
  const body = th.closest('table').tBodies[0], up = th.dataset.dir !== 'up';
  th.dataset.dir = up ? 'up' : 'down';
  const key = row => { const c = row.cells[column]; return c.dataset.v !== undefined ? parseFloat(c.dataset.v) : c.textContent; };
  [...body.rows].sort((a, b) => { const x = key(a), y = key(b); return (x < y ? -1 : x > y ? 1 : 0) * (up ? 1 : -1); })
    .forEach(row => body.appendChild(row));
}));
"""


def selection_threshold(report: Report) -> float | None:
    """The discrepancy that separates selected from unselected layers: ``Select.theta``, or
    midway between the two groups for a ``fraction`` / ``param_budget`` cut; None for
    ``random``, ``all``, ``none`` or before selection."""
    select = report.select
    if select is None or select.strategy not in ("small", "large"):
        return None
    if select.theta is not None:
        return select.theta
    chosen = [row.discrepancy for row in report.rows if row.selected and row.discrepancy is not None]
    others = [row.discrepancy for row in report.rows if row.selected is False and row.discrepancy is not None]
    if not chosen:
        return None
    inner, outer = (max(chosen), min(others, default=None)) if select.strategy == "small" else (
        min(chosen), max(others, default=None)
    )
    return inner if outer is None else (inner + outer) / 2


def discrepancy_plot(report: Report) -> bytes:
    """PNG bytes: one bar per layer in network order, green if selected, with the threshold."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import pyplot as plt
    except ImportError as error:
        raise ModuleNotFoundError("the HTML report draws with matplotlib: pip install matplotlib") from error
    rows = report.rows
    figure, axes = plt.subplots(figsize=(max(6.0, 0.32 * len(rows) + 2), 3.6), dpi=110)
    values = [row.discrepancy or 0.0 for row in rows]
    colours = [{True: SELECTED, False: UNSELECTED, None: "#4a7ab5"}[row.selected] for row in rows]
    axes.bar(range(len(rows)), values, color=colours)
    threshold = selection_threshold(report)
    if threshold is not None:
        axes.axhline(threshold, color="#d7301f", linestyle="--", linewidth=1.2, label=f"selection threshold {threshold:.4g}")
        axes.legend(loc="upper left", fontsize=8)
    axes.set_xticks(range(len(rows)), [row.name for row in rows], rotation=70, ha="right", fontsize=7)
    axes.set_ylabel(report.key)
    axes.set_title("discrepancy per layer, network order (green: selected for fine-tuning)", fontsize=10)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return buffer.getvalue()


def _summary(report: Report) -> str:
    config, select = report.config, report.select
    chosen = sum(bool(row.selected) for row in report.rows)
    share = report.trainable_quantizable_params / report.quantizable_params if report.quantizable_params else 0.0
    items = {
        "bits": bits_label(config.w_bits, config.a_bits) if config else "-",
        "selection": selection_words(select, selection_threshold(report)),
        "layers": f"{len(report.rows)} quantizable, {chosen} selected for fine-tuning",
        "layer parameters": f"{report.trainable_quantizable_params:,} trainable / {report.quantizable_params:,} ({share:.1%})",
        "all parameters": f"{report.trainable_params:,} trainable / {report.total_params:,}",
        "discrepancy": report.key,
    }
    rows = "".join(f"<dt>{escape(k)}</dt><dd>{escape(v)}</dd>" for k, v in items.items())
    notes = "".join(f'<p class="note">note: {escape(note)}</p>' for note in report.notes)
    return f"<dl>{rows}</dl>{notes}"


def _table(report: Report) -> str:
    header = "".join(f"<th>{h}</th>" for h in ("#", "layer", "kind", "params", "bits", escape(report.key), "selected", "trainable params"))
    lines = []
    for row in report.rows:
        bits = bits_label(row.w_bits, row.a_bits)
        value = "" if row.discrepancy is None else f"{row.discrepancy:.4g}"
        sort_value = "NaN" if row.discrepancy is None else repr(row.discrepancy)
        chosen = {True: "yes", False: "no", None: "-"}[row.selected]
        lines.append(
            f'<tr class="{"selected" if row.selected else ""}"><td data-v="{row.index}">{row.index}</td>'
            f'<td class="name">{escape(row.name)}</td><td class="kind">{escape(row.kind)}</td>'
            f'<td data-v="{row.params}">{row.params:,}</td><td>{bits}</td>'
            f'<td data-v="{sort_value}">{value}</td><td>{chosen}</td>'
            f'<td data-v="{row.trainable_params}">{row.trainable_params:,}</td></tr>'
        )
    return f'<table id="layers"><thead><tr>{header}</tr></thead><tbody>{"".join(lines)}</tbody></table>'


def render_html(report: Report, title: str = "ptqat-fx report") -> str:
    """The HTML page of ``report``."""
    plot = base64.b64encode(discrepancy_plot(report)).decode("ascii")
    graph = render_svg(layer_drawing(report.rows, report.layer_edges, "layer graph"))
    graph = graph[graph.index("<svg"):]
    return (
        f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{escape(title)}</title>'
        f"<style>{_STYLE}</style></head><body>\n<h1>{escape(title)}</h1>\n{_summary(report)}\n"
        f'<h2>Discrepancy per layer</h2>\n<img alt="discrepancy per layer" src="data:image/png;base64,{plot}">\n'
        f"<h2>Layers</h2><p>Click a column to sort.</p>\n{_table(report)}\n"
        "<h2>Layer graph</h2><p>Fill: discrepancy (pale yellow low, red high). Border: thick green "
        "selected (trainable), dashed grey frozen.</p>\n"
        f'<div class="graph">{graph}</div>\n<script>{_SCRIPT}</script>\n</body></html>\n'
    )


def write_html(report: Report, path: str | Path, title: str = "ptqat-fx report") -> Path:
    """Write ``render_html(report)`` to ``path`` (parents created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_html(report, title), encoding="utf-8")
    return path
