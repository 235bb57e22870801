"""Pictures of morphc graphs: Graphviz DOT, a pure-Python SVG, and one self-contained HTML page.

Extension nodes (the bypass branch ``morphc_ext.<site>`` and the ``add`` that joins it) are
filled orange, site nodes blue, inputs green, outputs grey, so original and extended graphs can be
compared at a glance::

    ext = morphc.extend(model, inputs, sites="all")
    write_html("graph.html", ext.traced.graph_module, ext.graph_module)   # no Graphviz needed
    render(side_by_side_dot(ext.traced.graph_module, ext.graph_module), "graph.svg")  # Graphviz

DOT is written here; the built-in SVG is :mod:`morphc.tools.svg_layout`, the HTML page
:mod:`morphc.tools.html_report`, rendering through Graphviz :mod:`morphc.ir.dot`; this module
re-exports their public functions so ``from morphc.tools import pictures`` reaches them all.
Every label is escaped for its format (DOT strings, XML, HTML), so node names, targets and titles
cannot inject markup.
"""

from __future__ import annotations

from torch import fx

from morphc.ir.dot import VizError, dot_string, graphviz_available, render
from morphc.tools.html_report import to_html, write_html
from morphc.tools.node_style import (
    EXTENSION_KINDS,
    STYLES,
    graph_of,
    node_kind,
    node_lines,
    node_shape,
)
from morphc.tools.svg_layout import side_by_side_svg, to_svg

__all__ = ["EXTENSION_KINDS", "STYLES", "VizError", "dot_string", "graphviz_available",
           "node_kind", "node_lines", "node_shape", "render", "side_by_side_dot",
           "side_by_side_svg", "to_dot", "to_html", "to_svg", "write_html"]


def _dot_body(gm, prefix: str) -> list[str]:
    """Node and edge statements; node ids are generated (``<prefix>n<i>``), never user text."""
    nodes = list(graph_of(gm).nodes)
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

