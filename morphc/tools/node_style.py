"""What a node of a morphc graph looks like in a picture: its kind, colour and label lines.

Shared by every picture format (:mod:`morphc.tools.pictures` for DOT, :mod:`morphc.tools.svg_layout`
for the built-in SVG, :mod:`morphc.tools.html_report` for the HTML page), so a node is drawn the
same way in each. Labels are returned as raw text: each format escapes them itself.
"""

from __future__ import annotations

from torch import fx

from morphc.ir.tags import Role, role_of, site_of

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
    role = role_of(node)
    if role in EXTENSION_KINDS:
        return str(role)
    if role is Role.SITE:
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
    if node_kind(node) == "site":
        lines.append(f"site {site_of(node)}")
    return [line if len(line) <= limit else line[:limit - 1] + "…" for line in lines]



def graph_of(gm) -> fx.Graph:
    """The ``fx.Graph`` of a GraphModule (or the graph itself)."""
    return gm if isinstance(gm, fx.Graph) else gm.graph
