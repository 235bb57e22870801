"""Pictures of morphc graphs: Graphviz DOT, a pure-Python SVG, and one self-contained HTML page.

Extension nodes (the bypass branch ``morphc_ext.<site>`` and the ``add`` that joins it) are
filled orange, site nodes blue, inputs green, outputs grey, so original and extended graphs can be
compared at a glance::

    ext = morphc.extend(model, inputs, sites="all")
    write_html("graph.html", ext.traced.graph_module, ext.graph_module)   # no Graphviz needed
    render(side_by_side_dot(ext.traced.graph_module, ext.graph_module), "graph.svg")  # Graphviz

Every label is escaped for its format (DOT strings, XML, HTML), so node names, targets and titles
cannot inject markup.
"""

from __future__ import annotations

import html
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from torch import fx

from morphc.errors import MorphcError
from morphc.ir.sites import ROLE_META, SITE_META


class VizError(MorphcError):
    """A picture cannot be produced (e.g. Graphviz is missing for .png/.svg rendering)."""


# kind → (fill, stroke, legend text); order is the legend's order
STYLES = {
    "extension": ("#ffb74d", "#e65100", "extension branch B·ρ(Ax+a) (inserted by morphc)"),
    "extension_add": ("#ffe0b2", "#e65100", "extension add: site output + branch"),
    "site": ("#bbdefb", "#0d47a1", "extension site (linear / conv / matmul weight)"),
    "placeholder": ("#c8e6c9", "#1b5e20", "graph input"),
    "output": ("#e0e0e0", "#424242", "graph output"),
    "get_attr": ("#f3e5f5", "#6a1b9a", "parameter / buffer read"),
    "op": ("#ffffff", "#757575", "other operation"),
}
EXTENSION_KINDS = ("extension", "extension_add")


# ---------------------------------------------------------------------------------------------
# facts about a node


def node_kind(node: fx.Node) -> str:
    """``extension`` / ``extension_add`` / ``site`` / ``placeholder`` / ``output`` /
    ``get_attr`` / ``op``."""
    role = node.meta.get(ROLE_META)
    if role in EXTENSION_KINDS:
        return role
    if node.meta.get(SITE_META) is not None:
        return "site"
    if node.op in ("placeholder", "output", "get_attr"):
        return node.op
    return "op"


def _shape_text(value) -> str | None:
    shape = getattr(value, "shape", None)
    if shape is not None:
        return "×".join(str(d) for d in shape) if len(shape) else "scalar"
    if isinstance(value, list | tuple) and value:
        parts = [_shape_text(v) for v in value]
        if any(parts):
            return "(" + ", ".join(p or "?" for p in parts) + ")"
    return None


def node_shape(node: fx.Node) -> str | None:
    """The node's output shape from ``tensor_meta`` (ShapeProp) or ``val`` (export), if known."""
    for key in ("tensor_meta", "val"):
        text = _shape_text(node.meta.get(key))
        if text:
            return text
    return None


def _target_text(node: fx.Node) -> str:
    from morphc.tools.graph_diff import target_name

    if node.op == "placeholder":
        return "input"
    if node.op == "output":
        return "output"
    if node.op == "call_method":
        return f".{node.target}()"
    text = target_name(node)
    if node.op == "call_function":
        parts = text.split(".")
        text = ".".join(parts[-2:]) if parts[0] != "aten" else text
    return text


def _module_type(node: fx.Node) -> str | None:
    owner = getattr(node.graph, "owning_module", None)
    if node.op != "call_module" or owner is None:
        return None
    try:
        return type(owner.get_submodule(node.target)).__name__
    except (AttributeError, TypeError):
        return None


def node_lines(node: fx.Node, limit: int = 36) -> list[str]:
    """Label lines: name, op target (or module type), shape (raw text; escape for the output
    format)."""
    lines = [node.name]
    target = _target_text(node)
    module_type = _module_type(node)
    if module_type is not None:
        lines.append(module_type if target == node.name else f"{module_type} {target}")
    elif target != node.name:
        lines.append(target if node.op in ("placeholder", "output") else f"{node.op}: {target}")
    shape = node_shape(node)
    if shape:
        lines.append(shape)
    if node.meta.get(SITE_META) is not None and node_kind(node) == "site":
        lines.append(f"site {node.meta[SITE_META]}")
    return [line if len(line) <= limit else line[:limit - 1] + "…" for line in lines]


def _graph(gm) -> fx.Graph:
    return gm if isinstance(gm, fx.Graph) else gm.graph


# ---------------------------------------------------------------------------------------------
# DOT


def dot_string(text) -> str:
    """A DOT double-quoted string: quotes and backslashes escaped, newlines as ``\\n``."""
    text = str(text).replace("\\", "\\\\").replace('"', '\\"')
    return '"' + text.replace("\r", "").replace("\n", "\\n") + '"'


def _dot_body(gm, prefix: str) -> list[str]:
    """Node and edge statements; node ids are generated (``<prefix>n<i>``), never user text."""
    nodes = list(_graph(gm).nodes)
    ids = {node: f"{prefix}n{i}" for i, node in enumerate(nodes)}
    lines = []
    for node in nodes:
        kind = node_kind(node)
        fill, stroke, _ = STYLES[kind]
        shape = "ellipse" if kind in ("placeholder", "output") else "box"
        width = 2.5 if kind in (*EXTENSION_KINDS, "site") else 1
        label = "\\n".join(dot_string(line)[1:-1] for line in node_lines(node))
        tooltip = dot_string(f"{node.op} {node.name}: {node.format_node()}")
        lines.append(f'  {ids[node]} [label="{label}", shape={shape}, fillcolor="{fill}", '
                     f'color="{stroke}", penwidth={width}, class="{kind}", tooltip={tooltip}];')
    for node in nodes:
        for source in node.all_input_nodes:
            ext = EXTENSION_KINDS
            colour = STYLES["extension"][1] if node_kind(node) in ext or \
                node_kind(source) in ext else "#616161"
            lines.append(f'  {ids[source]} -> {ids[node]} [color="{colour}"];')
    return lines


_DOT_HEAD = ['  graph [rankdir=TB, fontname="Helvetica", fontsize=12];',
             '  node [style="rounded,filled", fontname="Helvetica", fontsize=10];',
             '  edge [arrowsize=0.6];']
_LEGEND = "orange: extension (inserted) · blue: extension site · green: input · grey: output"


def to_dot(gm: fx.GraphModule | fx.Graph, title: str | None = None) -> str:
    """Graphviz DOT of an fx graph: one DOT node per fx node (name, op and target, shape).

    >>> print(to_dot(ext.graph_module, title="extended"))   # doctest: +SKIP
    digraph morphc { ... n2 [label="morphc_ext_conv1\\ncall_module: morphc_ext.conv1\\n..."
    """
    label = f"{title}\n{_LEGEND}" if title else _LEGEND
    return "\n".join(["digraph morphc {", *_DOT_HEAD,
                      f"  label={dot_string(label)}; labelloc=t;", *_dot_body(gm, ""), "}"]) + "\n"


def side_by_side_dot(left, right, labels: tuple[str, str] = ("original", "extended"),
                     title: str | None = None) -> str:
    """Two graphs in one DOT, each in its own cluster (``cluster_0`` left, ``cluster_1`` right)."""
    lines = ["digraph morphc {", *_DOT_HEAD, "  newrank=true;",
             f"  label={dot_string(f'{title}' + chr(10) + _LEGEND if title else _LEGEND)};"
             " labelloc=t;"]
    for i, (gm, name) in enumerate(zip((left, right), labels, strict=True)):
        lines += [f"  subgraph cluster_{i} {{", f"  label={dot_string(name)};",
                  '  style="rounded"; color="#9e9e9e";', *_dot_body(gm, f"g{i}_"), "  }"]
    return "\n".join([*lines, "}"]) + "\n"


def graphviz_available() -> bool:
    return shutil.which("dot") is not None


def render(dot_source: str, path: str | Path) -> Path:
    """Write ``dot_source`` to ``path``: ``.dot``/``.gv`` as text, ``.svg``/``.png``/``.pdf``
    through the Graphviz ``dot`` executable."""
    path = Path(path)
    fmt = path.suffix.lower().lstrip(".")
    if fmt in ("dot", "gv"):
        path.write_text(dot_source, encoding="utf-8")
        return path
    if fmt not in ("svg", "png", "pdf"):
        raise VizError(f"cannot render {path.name}: use a .svg, .png, .pdf or .dot file name")
    exe = shutil.which("dot")
    if exe is None:
        raise VizError(
            f"rendering {path.name} needs the Graphviz 'dot' program, which is not installed; "
            "install it (apt-get install graphviz / brew install graphviz / conda install "
            "graphviz), or write a .dot file (always works), or use morphc.tools.pictures.to_svg / "
            "write_html, which need no Graphviz")
    try:
        done = subprocess.run([exe, f"-T{fmt}", "-o", str(path)], input=dot_source.encode(),
                              capture_output=True, timeout=300, check=False)
    except subprocess.TimeoutExpired as e:
        raise VizError(f"Graphviz took over {e.timeout:.0f} s on {path.name}; write a .dot "
                       "file or use to_svg/write_html for big graphs") from e
    if done.returncode != 0:
        message = " ".join(done.stderr.decode(errors="replace").split())[:300]
        raise VizError(f"Graphviz failed to render {path.name}: {message}")
    return path


# ---------------------------------------------------------------------------------------------
# pure-Python SVG (layered layout, no Graphviz)


@dataclass
class _Box:
    node: fx.Node
    kind: str
    lines: list[str]
    w: float
    h: float
    x: float = 0.0
    y: float = 0.0


CHAR_W, LINE_H, PAD, GAP_X, GAP_Y, MARGIN = 6.6, 14.0, 8.0, 18.0, 34.0, 16.0


def _layers(graph: fx.Graph) -> list[list[fx.Node]]:
    """Rows of the layout: topological generations, with each parameter read (``get_attr``, of
    which torch.export graphs have one per weight) moved down to just above its first user."""
    import networkx as nx

    g = nx.DiGraph()
    g.add_nodes_from(graph.nodes)
    g.add_edges_from((src, node) for node in graph.nodes for src in node.all_input_nodes)
    level = {n: i for i, gen in enumerate(nx.topological_generations(g)) for n in gen}
    for node in graph.nodes:
        if node.op == "get_attr" and node.users:
            level[node] = min(level[user] for user in node.users) - 1
    rows: list[list[fx.Node]] = [[] for _ in range(max(level.values(), default=-1) + 1)]
    for node in graph.nodes:   # graph order within a row
        rows[level[node]].append(node)
    return [row for row in rows if row]


def _layout(gm, top: float = MARGIN) -> tuple[list[_Box], float, float]:
    """Layered layout: a row per topological generation, each row ordered by the mean x of the
    node's inputs (barycenter), rows centred."""
    rows, placed, y = [], {}, top
    for layer in _layers(_graph(gm)):
        boxes = []
        for node in layer:
            lines = node_lines(node)
            boxes.append(_Box(node, node_kind(node), lines,
                              max(map(len, lines)) * CHAR_W + 2 * PAD, len(lines) * LINE_H + PAD))
        def centre(box):
            xs = [placed[s].x + placed[s].w / 2 for s in box.node.all_input_nodes if s in placed]
            return sum(xs) / len(xs) if xs else float("inf")
        boxes.sort(key=centre)  # stable: graph order breaks ties
        x, height = 0.0, max(b.h for b in boxes)
        for box in boxes:
            box.x, box.y, x = x, y, x + box.w + GAP_X
            placed[box.node] = box
        rows.append((boxes, x - GAP_X))
        y += height + GAP_Y
    width = max((w for _, w in rows), default=0.0)
    for boxes, row_width in rows:
        shift = MARGIN + (width - row_width) / 2
        for box in boxes:
            box.x += shift
    return [b for boxes, _ in rows for b in boxes], width + 2 * MARGIN, y - GAP_Y + MARGIN


def _svg_group(gm, uid: str, title: str | None) -> tuple[str, float, float]:
    """SVG markup (without the ``<svg>`` element) of one graph, its width and height."""
    boxes, width, height = _layout(gm, MARGIN + 20 if title else MARGIN)
    where = {b.node: b for b in boxes}
    esc = html.escape
    parts = [f'<g class="morphc-graph" id="{uid}">']
    if title:
        parts.append(f'<text class="graph-title" x="{MARGIN}" y="{MARGIN + 4}" '
                     f'font-weight="bold" font-size="13">{esc(title)}</text>')
    for box in boxes:
        for src in box.node.all_input_nodes:
            a = where[src]
            sx, sy, tx, ty = a.x + a.w / 2, a.y + a.h, box.x + box.w / 2, box.y
            ext = box.kind in EXTENSION_KINDS or a.kind in EXTENSION_KINDS
            colour = STYLES["extension"][1] if ext else "#9e9e9e"
            mid = (sy + ty) / 2
            parts.append(f'<path class="edge{" extension" if ext else ""}" d="M{sx:.1f},{sy:.1f}'
                         f' C{sx:.1f},{mid:.1f} {tx:.1f},{mid:.1f} {tx:.1f},{ty - 3:.1f}" '
                         f'fill="none" stroke="{colour}" stroke-width="{1.6 if ext else 1}" '
                         f'marker-end="url(#{uid}-arrow{"-ext" if ext else ""})"/>')
    for box in boxes:
        fill, stroke, _ = STYLES[box.kind]
        strong = box.kind in (*EXTENSION_KINDS, "site")
        rx = box.h / 2 if box.kind in ("placeholder", "output") else 5
        parts.append(f'<g class="node {box.kind}" data-name="{esc(box.node.name)}" '
                     f'data-op="{esc(box.node.op)}"><title>{esc(box.node.format_node())}</title>'
                     f'<rect x="{box.x:.1f}" y="{box.y:.1f}" width="{box.w:.1f}" '
                     f'height="{box.h:.1f}" rx="{rx:.1f}" fill="{fill}" stroke="{stroke}" '
                     f'stroke-width="{2.2 if strong else 1}"/>')
        for i, line in enumerate(box.lines):
            weight = ' font-weight="bold"' if i == 0 else ""
            parts.append(f'<text x="{box.x + box.w / 2:.1f}" '
                         f'y="{box.y + PAD / 2 + (i + 0.8) * LINE_H:.1f}" '
                         f'text-anchor="middle"{weight}>{esc(line)}</text>')
        parts.append("</g>")
    parts.append("</g>")
    return "\n".join(parts), width, height


def _svg_defs(uid: str) -> str:
    arrows = [(f"{uid}-arrow", "#9e9e9e"), (f"{uid}-arrow-ext", STYLES["extension"][1])]
    return "<defs>" + "".join(
        f'<marker id="{i}" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" '
        f'markerHeight="7" orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" '
        f'fill="{c}"/></marker>' for i, c in arrows) + "</defs>"


def _svg_document(groups: list[tuple[str, float, float]], uid: str) -> str:
    width = sum(w for _, w, _ in groups) + GAP_X * (len(groups) - 1)
    height = max(h for _, _, h in groups)
    body, x = [], 0.0
    for markup, w, _ in groups:
        body.append(f'<g transform="translate({x:.1f},0)">{markup}</g>')
        x += w + GAP_X
    return (f'<svg xmlns="http://www.w3.org/2000/svg" class="morphc-svg" width="{width:.0f}" '
            f'height="{height:.0f}" viewBox="0 0 {width:.0f} {height:.0f}" '
            f'font-family="Menlo, Consolas, monospace" font-size="11">'
            f"{_svg_defs(uid)}{''.join(body)}</svg>\n")


def to_svg(gm: fx.GraphModule | fx.Graph, title: str | None = None, uid: str = "g0") -> str:
    """A standalone SVG of the graph with a layered layout; no Graphviz needed. Each node is a
    ``<g class="node KIND" data-name="...">`` so it can be found (and styled) by kind.
    ``uid`` keeps element ids unique when several SVGs share one page."""
    return _svg_document([_svg_group(gm, uid, title)], uid)


def side_by_side_svg(left, right, labels: tuple[str, str] = ("original", "extended")) -> str:
    """Two graphs side by side in one SVG."""
    return _svg_document([_svg_group(left, "g0", labels[0]), _svg_group(right, "g1", labels[1])],
                         "g0")


# ---------------------------------------------------------------------------------------------
# HTML


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
    present = {node_kind(n) for gm in graphs for n in _graph(gm).nodes}
    items = [f'<li><span class="swatch" style="background:{fill};border-color:{stroke}"></span>'
             f"{html.escape(text)}</li>"
             for kind, (fill, stroke, text) in STYLES.items() if kind in present or kind == "op"]
    return f'<ul class="legend">{"".join(items)}</ul>'


def _summary(gm) -> str:
    kinds = [node_kind(n) for n in _graph(gm).nodes]
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
                       f'{_svg_document([_svg_group(gm, f"g{i}", None)], f"g{i}")}</figure>')
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
