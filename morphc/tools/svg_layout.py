"""A pure-Python SVG of an fx graph (layered layout, no Graphviz).

Each node is a ``<g class="node KIND" data-name="...">`` coloured by its kind
(:data:`morphc.tools.node_style.STYLES`); every label is XML-escaped::

    svg = to_svg(ext.graph_module, title="extended")
    svg = side_by_side_svg(ext.traced.graph_module, ext.graph_module)
"""

from __future__ import annotations

import html
from dataclasses import dataclass

from torch import fx

from morphc.tools.node_style import EXTENSION_KINDS, STYLES, graph_of, node_kind, node_lines


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
    for layer in _layers(graph_of(gm)):
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


def svg_group(gm, uid: str, title: str | None) -> tuple[str, float, float]:
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


def svg_document(groups: list[tuple[str, float, float]], uid: str) -> str:
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
    return svg_document([svg_group(gm, uid, title)], uid)


def side_by_side_svg(left, right, labels: tuple[str, str] = ("original", "extended")) -> str:
    """Two graphs side by side in one SVG."""
    return svg_document([svg_group(left, "g0", labels[0]), svg_group(right, "g1", labels[1])],
                        "g0")

