"""Writing an explored model space: ``space.json`` (nodes, moves, scores), ``space.dot`` (+ SVG
with Graphviz) and the best architecture as a saved file (``morphc.space.saving``)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from torch import nn

from morphc.errors import FormatError
from morphc.ir.dot import dot_string, graphviz_available, render
from morphc.space.encoding import SPACE_FORMAT, VERSION, graph_to_json
from morphc.space.saving import save


# -- explored spaces ----------------------------------------------------------------------------
def _architecture(module: nn.Module) -> dict:
    try:
        return graph_to_json(module)
    except FormatError as exc:
        return {"error": str(exc)}


def _json_score(score: float | None) -> float | None:
    """A NaN or infinite score as null: ``json.dumps`` would write ``NaN``, which is not JSON."""
    return score if score is None or math.isfinite(score) else None


def space_to_json(space) -> dict:
    """Nodes (hash, scores, steps, params, architecture as data) and edges (moves, measured
    change), plus refused moves. Weights are not included (see ``save_space``)."""
    best = space.best()[0] if space._best is not None else None
    nodes = []
    for node, attrs in sorted(space.graph.nodes(data=True), key=lambda item: item[1]["order"]):
        nodes.append({"id": node, **{k: attrs[k] for k in ("order", "kind", "summary", "params",
                                                         "steps", "visits")},
                      "score": _json_score(attrs["score"]),
                      "scores": [[steps, _json_score(v)] for steps, v in attrs["scores"]],
                      "architecture": _architecture(attrs["module"])})
    edges = [{"source": u, "target": v, **{k: attrs[k] for k in (
        "move", "spec", "change", "change_train", "count", "order")}}
             for u, v, attrs in sorted(space.graph.edges(data=True),
                                       key=lambda item: item[2]["order"])]
    return {"format": SPACE_FORMAT, "version": VERSION, "root": space.root, "best": best,
            "tolerance": space.tolerance, "train_tolerance": space.train_tolerance,
            "steps_spent": space.steps_spent, "nodes": nodes,
            "edges": edges, "rejected": space.rejected}


def space_to_dot(space) -> str:
    """Graphviz DOT: one box per architecture (hash, layers, parameters, steps, score), one
    arrow per move (with the measured function change); root and best are highlighted."""
    best = space.best()[0] if space._best is not None else None
    lines = ["digraph model_space {", "  rankdir=LR;",
             '  node [shape=box, fontname="Helvetica", fontsize=10];',
             '  edge [fontname="Helvetica", fontsize=9];']
    for node, attrs in space.graph.nodes(data=True):
        score = "-" if attrs["score"] is None else f"{attrs['score']:.4f}"
        label = (f"{node[:8]} ({attrs['kind']})\n{attrs['summary']}\n"
                 f"params {attrs['params']}, steps {attrs['steps']}\nscore {score}")
        style = ', style=filled, fillcolor="palegreen"' if node == best else \
            (', style=filled, fillcolor="lightgrey"' if node == space.root else "")
        lines.append(f"  {dot_string(node)} [label={dot_string(label)}{style}];")
    for u, v, attrs in space.graph.edges(data=True):
        label = f"{attrs['move']}\nΔ={attrs['change']:.1e}"
        lines.append(f"  {dot_string(u)} -> {dot_string(v)} [label={dot_string(label)}];")
    lines.append("}")
    return "\n".join(lines) + "\n"


def render_svg(dot_path: Path) -> Path | None:
    """``dot -Tsvg`` when Graphviz is installed; None (nothing written) otherwise."""
    if not graphviz_available():
        return None
    return render(dot_path.read_text(encoding="utf-8"), dot_path.with_suffix(".svg"))


def save_space(space, directory, *, weights: str = "best") -> dict[str, Path]:
    """Write ``space.json``, ``space.dot``, ``space.svg`` (if Graphviz is installed) and the best
    evaluated architecture as ``best.{json,pt,py}``; ``weights="all"`` also writes every node's
    current module as ``nodes/<hash>.{json,pt,py}``."""
    if weights not in ("best", "all", "none"):
        raise ValueError(f"weights must be 'best', 'all' or 'none', got {weights!r}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = {"json": directory / "space.json", "dot": directory / "space.dot"}
    paths["json"].write_text(json.dumps(space_to_json(space), indent=1))
    paths["dot"].write_text(space_to_dot(space))
    svg = render_svg(paths["dot"])
    if svg is not None:
        paths["svg"] = svg
    if weights != "none" and space._best is not None:
        for ext, path in save(space.best()[1], directory / "best").items():
            paths[f"best_{ext}"] = path
    if weights == "all":
        for node, attrs in space.graph.nodes(data=True):
            try:
                save(attrs["module"], directory / "nodes" / node)
            except FormatError:
                continue          # listed with its error in space.json
    return paths
