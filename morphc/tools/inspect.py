"""``morphc.inspect``: what morphc sees in a model (sites, shapes, cost) and what it did to it."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import torch
from torch import fx, nn

from morphc.compiler.escape import Probe, escape_scores
from morphc.compiler.extended import ExtendedModel
from morphc.ir.kinds import site_macs
from morphc.ir.trace import trace
from morphc.passes.find_sites import find_sites
from morphc.passes.infra import Pipeline


def _concrete(shape, batch: int | None) -> tuple[int, ...] | None:
    if shape is None:
        return None
    return tuple(batch if d == -1 and batch is not None else d for d in shape)


@dataclass
class SiteRow:
    name: str
    kind: str
    op: str
    weight: str
    nodes: list[str]
    input_shape: list[int] | None
    output_shape: list[int] | None
    params: int
    flops: int
    excluded: str | None = None
    width: int | None = None
    family: str | None = None
    branch_params: int | None = None
    residual: float | None = None
    escape_score: float | None = None
    frozen: bool = False         # requires_grad=False: extended only when named explicitly


@dataclass
class InspectionReport:
    """Per-site table plus model-level facts. ``print(report)`` for people, ``to_json()`` for
    tools."""

    model: str
    frontend: str
    frontend_reason: str
    rows: list[SiteRow]
    extended: bool = False
    homotopy: float | None = None
    constraint_residual: float | None = None
    total_params: int = 0
    notes: list[str] = field(default_factory=list)
    trace_seconds: float = 0.0          # what tracing cost (0 when the trace came from the cache)
    specialised: list[str] = field(default_factory=list)   # dims torch.export fixed, and why
    exclusions: dict[str, str] = field(default_factory=dict)   # linear weights that are no site
    graph_module: fx.GraphModule | None = field(default=None, repr=False)
    original_graph_module: fx.GraphModule | None = field(default=None, repr=False)

    def to_dict(self) -> dict:
        data = {k: v for k, v in asdict(self).items()
                if k not in ("graph_module", "original_graph_module")}
        return data

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_dict(), **{"indent": 2, **kwargs})

    def __str__(self) -> str:
        head = [f"{self.model}: {len(self.rows)} sites, {self.total_params:,} parameters, "
                f"frontend {self.frontend} ({self.frontend_reason}), traced in "
                f"{self.trace_seconds:.2f} s"]
        head += [f"specialised: {s}" for s in self.specialised]
        head += [f"not a site: {name}: {why}" for name, why in self.exclusions.items()]
        if self.extended:
            head.append(f"extended: homotopy s = {self.homotopy:g}, constraint residual "
                        f"{self.constraint_residual:.3g}")
        head += [f"note: {n}" for n in self.notes]
        columns = ["site", "kind", "op", "weight", "in", "out", "params", "FLOPs"]
        if self.extended:
            columns += ["width", "family", "+params", "residual"]
        if any(r.escape_score is not None for r in self.rows):
            columns.append("escape")
        columns.append("status")
        table = [columns] + [self._cells(r, columns) for r in self.rows]
        widths = [max(len(row[i]) for row in table) for i in range(len(columns))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
                 for row in table]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(head + lines)

    @staticmethod
    def _cells(r: SiteRow, columns: list[str]) -> list[str]:
        def shape(s):
            return "×".join(map(str, s)) if s else "?"
        cells = {
            "site": r.name, "kind": r.kind, "op": r.op, "weight": r.weight,
            "in": shape(r.input_shape), "out": shape(r.output_shape), "params": f"{r.params:,}",
            "FLOPs": f"{r.flops:,}", "width": "" if r.width is None else str(r.width),
            "family": r.family or "", "+params": "" if r.branch_params is None
            else f"{r.branch_params:,}",
            "residual": "" if r.residual is None else f"{r.residual:.2g}",
            "escape": "" if r.escape_score is None else f"{r.escape_score:.3g}",
            "status": f"excluded: {r.excluded}" if r.excluded else
            ("extended" if r.width is not None else
             "frozen: extended only when named" if r.frozen else "ok"),
        }
        return [cells[c] for c in columns]


def _probe_from(probe) -> Probe | None:
    """Accept ``probe(module) -> loss`` or a ``(inputs, targets, loss_fn)`` triple."""
    if probe is None or callable(probe):
        return probe
    inputs, targets, loss_fn = probe
    inputs = inputs if isinstance(inputs, tuple) else (inputs,)
    return lambda module: loss_fn(module(*inputs), targets)


def inspect(model_or_ext: nn.Module, example_inputs=None, probe=None, *, kwargs=None,
            dynamic_shapes=None) -> InspectionReport:
    """Report the sites of a model, or of an extended model with its branches' state.

    Inputs as for ``morphc.extend``: positional ``example_inputs``, keyword ``kwargs``,
    torch.export's ``dynamic_shapes``.

    >>> report = inspect(nn.Sequential(nn.Linear(4, 3)), (torch.randn(2, 4),))
    >>> report.rows[0].weight
    '0.weight'
    """
    probe = _probe_from(probe)
    if isinstance(model_or_ext, ExtendedModel):
        ext = model_or_ext
        traced, table, model = ext.extension_traced, ext.site_table, ext.model
        scores = escape_scores(ext, probe) if probe is not None else {}
    else:
        ext, model = None, model_or_ext
        traced = trace(model, example_inputs, kwargs=kwargs, dynamic_shapes=dynamic_shapes)
        table = Pipeline(traced.graph_module).run(find_sites).analysis
        scores = {}
        if probe is not None and table.extendable():
            from morphc.compiler.extend import extend  # late: api builds on this module's siblings
            scores = escape_scores(extend(model, example_inputs, sites="all", traced=traced),
                                   probe)
    batch_source = traced.example_inputs or tuple(
        v for v in traced.example_kwargs.values() if isinstance(v, torch.Tensor))
    batch = None
    first = batch_source[0] if batch_source else None
    if isinstance(first, torch.Tensor) and first.dim() > 0:
        batch = int(first.shape[0])
    frozen = {n for n, p in model.named_parameters(remove_duplicate=False)
              if not p.requires_grad}
    rows = []
    for site in table.values():
        use = site.uses[0]
        out_shape = _concrete(use.output_shape, batch)
        weight = traced.graph_module.get_parameter(site.weight_name)
        biases = {u.bias_name for u in site.uses if u.bias_name}
        params = weight.numel() + sum(traced.graph_module.get_parameter(b).numel()
                                      for b in biases)
        flops = 2 * sum(site_macs(site, _concrete(u.output_shape, batch)) for u in site.uses)
        row = SiteRow(site.name, site.kind, use.op, site.weight_name, site.node_names,
                      list(_concrete(use.input_shape, batch) or []) or None,
                      list(out_shape or []) or None, params, flops, site.excluded,
                      escape_score=scores.get(site.name),
                      frozen=site.weight_name in frozen)
        if ext is not None and site.name in ext.extension_branches:
            branch = ext.extension_branches[site.name]
            row.width, row.family = branch.width, branch.family_name
            row.branch_params = sum(p.numel() for p in branch.parameters())
            row.residual = float(branch.constraint_residual().detach())
        rows.append(row)
    return InspectionReport(
        model=type(model).__name__, frontend=traced.frontend, frontend_reason=traced.reason,
        rows=rows, extended=ext is not None,
        homotopy=ext.homotopy if ext is not None else None,
        constraint_residual=ext.constraint_residual() if ext is not None else None,
        total_params=sum(p.numel() for p in (ext or model).parameters()),
        notes=list(traced.notes), trace_seconds=0.0 if traced.cached else traced.trace_seconds,
        specialised=[str(s) for s in traced.specialised],
        exclusions=dict(getattr(table, "exclusions", {})),
        graph_module=ext.graph_module if ext is not None else traced.graph_module,
        original_graph_module=traced.graph_module if ext is not None else None)
