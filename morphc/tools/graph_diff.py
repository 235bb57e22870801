"""What a morph changed: nodes added and removed between two graphs, and how far outputs moved.

    >>> ext = morphc.extend(model, inputs, sites="all")
    >>> print(diff_graphs(ext.traced.graph_module, ext.graph_module))   # +2 nodes per site use
    >>> measure_deviation(model, ext, inputs)                            # 0.0 (E1)

Nodes are matched by ``(op, target, name)`` first, then any left over by ``(op, target)`` in
graph order (reported as renamed), so a rewrite that only renames a node is not counted as a
removal plus an addition.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass, field

from torch import fx, nn
from torch.fx.node import _get_qualified_name

from morphc.compiler.deviation import deterministic_forward, relative_deviation
from morphc.ir.example_inputs import as_tuple
from morphc.ir.tags import role_of, site_of


def target_name(node: fx.Node) -> str:
    """A readable, stable name for a node's target (``torch.relu``, ``aten.linear.default``)."""
    target = node.target
    if isinstance(target, str):
        return target
    if hasattr(target, "_schema") or type(target).__name__.startswith("OpOverload"):
        return str(target)
    try:
        name = _get_qualified_name(target)
    except Exception:  # an unusual callable: its repr is still readable
        return str(target)
    return "operator." + name.removeprefix("_operator.") if name.startswith("_operator.") \
        else name


@dataclass
class NodeInfo:
    name: str
    op: str
    target: str
    role: str | None = None   # "extension" / "extension_add" for nodes morphc inserted
    site: str | None = None   # the site this node belongs to, if any

    @classmethod
    def of(cls, node: fx.Node) -> NodeInfo:
        return cls(node.name, node.op, target_name(node), role_of(node),
                   site_of(node))

    def __str__(self) -> str:
        text = f"{self.op} {self.name}"
        if self.target != self.name:
            text += f" ({self.target})"
        if self.role:
            text += f" [{self.role} of {self.site}]"
        return text


@dataclass
class GraphDiff:
    """Nodes of graph B not in A (``added``), of A not in B (``removed``), and matched pairs
    whose names differ (``renamed``: ``(name in A, name in B)``)."""

    nodes_a: int
    nodes_b: int
    added: list[NodeInfo] = field(default_factory=list)
    removed: list[NodeInfo] = field(default_factory=list)
    renamed: list[tuple[str, str]] = field(default_factory=list)

    @property
    def unchanged(self) -> int:
        return self.nodes_a - len(self.removed)

    @property
    def identical(self) -> bool:
        return not (self.added or self.removed or self.renamed)

    def added_by_role(self) -> dict[str | None, int]:
        counts: dict[str | None, int] = defaultdict(int)
        for info in self.added:
            counts[info.role] += 1
        return dict(counts)

    def to_dict(self) -> dict:
        return {"nodes_a": self.nodes_a, "nodes_b": self.nodes_b, "unchanged": self.unchanged,
                "added": [asdict(n) for n in self.added],
                "removed": [asdict(n) for n in self.removed],
                "renamed": [list(pair) for pair in self.renamed]}

    def __str__(self) -> str:
        head = (f"graph diff: {self.nodes_a} → {self.nodes_b} nodes; +{len(self.added)} added, "
                f"-{len(self.removed)} removed, {len(self.renamed)} renamed, "
                f"{self.unchanged} matched")
        lines = [head]
        lines += [f"  + {n}" for n in self.added]
        lines += [f"  - {n}" for n in self.removed]
        lines += [f"  ~ {a} → {b}" for a, b in self.renamed]
        return "\n".join(lines)


def _graph(obj) -> fx.Graph:
    if isinstance(obj, fx.Graph):
        return obj
    if isinstance(obj, fx.GraphModule):
        return obj.graph
    raise TypeError(f"diff_graphs compares fx graphs or GraphModules, got {type(obj).__name__}; "
                    "use diff_models for nn.Modules")


def diff_graphs(gm_a: fx.GraphModule | fx.Graph, gm_b: fx.GraphModule | fx.Graph) -> GraphDiff:
    """Nodes added and removed going from graph A to graph B.

    >>> diff = diff_graphs(ext.traced.graph_module, ext.graph_module)
    >>> diff.added_by_role()          # {'extension': n_uses, 'extension_add': n_uses}
    """
    nodes_a, nodes_b = list(_graph(gm_a).nodes), list(_graph(gm_b).nodes)
    # 1. exact matches: same op, target and name
    exact_b = {(n.op, target_name(n), n.name) for n in nodes_b}
    exact_a = {(n.op, target_name(n), n.name) for n in nodes_a}
    left_a = [n for n in nodes_a if (n.op, target_name(n), n.name) not in exact_b]
    left_b = [n for n in nodes_b if (n.op, target_name(n), n.name) not in exact_a]
    # 2. the rest by (op, target), in graph order: renamed nodes
    pool: dict[tuple[str, str], list[fx.Node]] = defaultdict(list)
    for node in left_b:
        pool[(node.op, target_name(node))].append(node)
    renamed, removed = [], []
    for node in left_a:
        candidates = pool.get((node.op, target_name(node)))
        if candidates:
            renamed.append((node.name, candidates.pop(0).name))
        else:
            removed.append(NodeInfo.of(node))
    matched_b = {b for _, b in renamed}
    added = [NodeInfo.of(n) for n in left_b if n.name not in matched_b]
    return GraphDiff(len(nodes_a), len(nodes_b), added, removed, renamed)


def measure_deviation(a, b, example_inputs, kwargs: dict | None = None) -> float:
    """Max relative deviation ``max|a(x) − b(x)| / max|a(x)|`` over all tensor outputs.

    Both run as :func:`~morphc.compiler.deviation.deterministic_forward`: under ``no_grad`` with
    the same RNG seed; BatchNorm statistics are left as they were. ``0.0`` means identical outputs.
    """
    inputs = as_tuple(example_inputs)
    return relative_deviation(deterministic_forward(a, inputs, kwargs=kwargs),
                              deterministic_forward(b, inputs, kwargs=kwargs))


@dataclass
class ModelDiff:
    """A graph diff plus the measured output deviation between two models."""

    graph: GraphDiff
    deviation: float | None
    note: str = ""

    def to_dict(self) -> dict:
        return {"graph": self.graph.to_dict(), "deviation": self.deviation, "note": self.note}

    def __str__(self) -> str:
        dev = "not measured" if self.deviation is None else f"{self.deviation:.3g}"
        text = f"{self.graph}\nmax relative deviation: {dev}"
        return f"{text} ({self.note})" if self.note else text


def _graph_module_of(obj, inputs: tuple, other) -> fx.GraphModule:
    from morphc.compiler.extended import ExtendedModel
    from morphc.ir.trace import trace

    if isinstance(obj, fx.GraphModule):
        return obj
    if isinstance(obj, ExtendedModel):
        return obj.graph_module
    if isinstance(other, ExtendedModel) and obj is other.model:
        # the user's model next to its extension: before contraction, its traced graph; after,
        # the graph contraction produced
        if other.contracted and other.contracted_graph_module is not None:
            return other.contracted_graph_module
        return other.extension_traced.graph_module
    return trace(obj, inputs).graph_module


def diff_models(a: nn.Module, b: nn.Module, example_inputs, *,
                reference_outputs=None) -> ModelDiff:
    """Compare two models: graph nodes added/removed and output deviation.

    Original vs extended: ``diff_models(model, ext, inputs)`` (deviation 0: E1). Extended vs
    contracted: ``diff_models(ext, morphc.contract(ext), inputs)``. A contracted
    ``ExtendedModel`` cannot run any more, so pass ``reference_outputs=ext(inputs)`` taken before
    contracting (they stand in for ``a``'s outputs); without them the deviation
    ``morphc.contract`` measured is reported.
    """
    from morphc.compiler.extended import ExtendedModel

    inputs = as_tuple(example_inputs)
    graph = diff_graphs(_graph_module_of(a, inputs, b), _graph_module_of(b, inputs, a))
    contracted = [m for m in (a, b) if isinstance(m, ExtendedModel) and m.contracted]
    if reference_outputs is not None:
        deviation = relative_deviation(reference_outputs, deterministic_forward(b, inputs))
        return ModelDiff(graph, deviation, "against the given reference outputs")
    if contracted:
        report = contracted[0].contraction_report
        return ModelDiff(graph, report.deviation if report else None,
                         "as measured by morphc.contract on its example inputs")
    return ModelDiff(graph, measure_deviation(a, b, inputs))
