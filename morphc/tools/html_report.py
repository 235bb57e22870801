"""One self-contained HTML page of morphc graphs: inline SVG and CSS, no scripts, no URLs.

    write_html("graph.html", ext.traced.graph_module, ext.graph_module,
               reports=[morphc.inspect(ext)])

Every text that reaches the page (titles, node names, report cells) is HTML-escaped.
"""

from __future__ import annotations

import html
from pathlib import Path

from morphc.tools.node_style import EXTENSION_KINDS, STYLES, graph_of, node_kind
from morphc.tools.svg_layout import svg_document, svg_group

_CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #212121; }
h1 { font-size: 1.3em; margin: 0 0 .4em 0; }
.legend { display: flex; flex-wrap: wrap; gap: .4em 1.4em; margin: .6em 0 1em 0; padding: 0;
  list-style: none; font-size: .9em; }
.legend li { display: flex; align-items: center; gap: .4em; }
.swatch { width: 1.1em; height: .9em; border: 2px solid; border-radius: 3px;
  display: inline-block; }
.graphs { display: flex; gap: 1.2em; align-items: flex-start; overflow-x: auto; }
figure { margin: 0; border: 1px solid #e0e0e0; border-radius: 6px; padding: .5em; }
figcaption { font-weight: bold; margin-bottom: .3em; }
.node:hover rect { stroke-width: 3; }
table.report { border-collapse: collapse; font-size: .85em; margin-top: 1em; }
table.report th, table.report td { border: 1px solid #e0e0e0; padding: 2px 6px; text-align: left; }
pre.report { background: #fafafa; border: 1px solid #e0e0e0; padding: .8em; overflow-x: auto; }
"""

_REPORT_COLUMNS = ("name", "kind", "op", "weight", "input_shape", "output_shape", "params",
                   "flops", "width", "family", "residual", "escape_score", "excluded")


def _legend_html(graphs: list) -> str:
    present = {node_kind(n) for gm in graphs for n in graph_of(gm).nodes}
    items = [f'<li><span class="swatch" style="background:{fill};border-color:{stroke}"></span>'
             f"{html.escape(text)}</li>"
             for kind, (fill, stroke, text) in STYLES.items() if kind in present or kind == "op"]
    return f'<ul class="legend">{"".join(items)}</ul>'


def _summary(gm) -> str:
    kinds = [node_kind(n) for n in graph_of(gm).nodes]
    ext = sum(k in EXTENSION_KINDS for k in kinds)
    return (f"{len(kinds)} nodes, {kinds.count('site')} site nodes"
            + (f", {ext} extension nodes" if ext else ""))


def _report_table(report) -> str:
    """An ``InspectionReport``'s rows as an HTML table (every cell escaped)."""
    rows = report.to_dict().get("rows", [])
    columns = [c for c in _REPORT_COLUMNS if any(r.get(c) is not None for r in rows)]

    def cell(value):
        if isinstance(value, list):
            value = "×".join(map(str, value))
        elif isinstance(value, float):
            value = f"{value:.3g}"
        return html.escape("" if value is None else str(value))
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{cell(r.get(c))}</td>" for c in columns) + "</tr>"
                   for r in rows)
    caption = html.escape(f"{report.model} ({'extended' if report.extended else 'original'}), "
                          f"frontend {report.frontend}")
    return (f'<table class="report"><caption>{caption}</caption><thead><tr>{head}</tr></thead>'
            f"<tbody>{body}</tbody></table>")


def to_html(left, right=None, title: str = "morphc graph",
            labels: tuple[str, str] = ("original", "extended"), report_text: str | None = None,
            reports=()) -> str:
    """One self-contained HTML page (inline SVG and CSS, no scripts, no external URLs): the
    graph(s) side by side, a legend, and optionally inspection reports (``reports``: tables of
    ``InspectionReport`` rows) and free text (``report_text``, shown preformatted)."""
    graphs = [left] if right is None else [left, right]
    figures = []
    for i, gm in enumerate(graphs):
        caption = html.escape(f"{labels[i]} — {_summary(gm)}")
        figures.append(f'<figure><figcaption>{caption}</figcaption>'
                       f'{svg_document([svg_group(gm, f"g{i}", None)], f"g{i}")}</figure>')
    tables = "".join(_report_table(r) for r in reports)
    text = f'<pre class="report">{html.escape(report_text)}</pre>' if report_text else ""
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>"
            f"<h1>{html.escape(title)}</h1>{_legend_html(graphs)}"
            f'<div class="graphs">{"".join(figures)}</div>{tables}{text}</body></html>\n')


def write_html(path: str | Path, left, right=None, **kwargs) -> Path:
    """Write :func:`to_html` to ``path`` (UTF-8); return the path."""
    path = Path(path)
    path.write_text(to_html(left, right, **kwargs), encoding="utf-8")
    return path
