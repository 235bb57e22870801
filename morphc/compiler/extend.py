"""``morphc.extend`` and ``morphc.contract``: the two moves the rest of morphc is built from."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import nn

from morphc.compiler.escape import Probe, escape_scores
from morphc.compiler.extended import ContractionReport, ExtendedModel, ExtensionConfig
from morphc.errors import ContractionError, SiteError
from morphc.ir.branch import BypassBranch
from morphc.ir.sites import Site, SiteSpec, select_sites
from morphc.ir.trace import TracedModel, no_side_effects, trace
from morphc.passes.find_sites import find_sites
from morphc.passes.fold_extension import fold_extension
from morphc.passes.infra import copy_graph_module, run_pass
from morphc.passes.insert_extension import insert_extension

Width = int | float


def resolve_width(site: Site, width: Width) -> int:
    """An int is a unit count; a float in (0, 1] a fraction of the site's output size. Convs
    round up to a multiple of ``groups`` so the branch can be grouped like the site."""
    if isinstance(width, bool) or not isinstance(width, int | float) or width <= 0:
        raise SiteError(f"width must be a positive int or a fraction in (0, 1], got {width!r}")
    if isinstance(width, float):
        if width > 1:
            raise SiteError(f"a fractional width must be in (0, 1], got {width}; "
                            "pass an int for a unit count")
        units = max(1, round(width * site.out_features))
    else:
        units = width
    return int(math.ceil(units / site.groups) * site.groups)


def _option(overrides: Mapping[str, Mapping] | None, site: Site, key: str, default):
    for pattern, values in (overrides or {}).items():
        if pattern in (site.name, site.weight_name) and key in values:
            return values[key]
    return default


def _build(model, traced, table, chosen, width, activation, overrides, seed, init_scale,
           selection, scores=None) -> ExtendedModel:
    gm = copy_graph_module(traced.graph_module)
    generator = torch.Generator().manual_seed(seed)
    weight0 = gm.get_parameter(chosen[0].weight_name)
    homotopy = torch.ones((), dtype=torch.float32, device=weight0.device)
    branches = {}
    for site in chosen:
        weight = gm.get_parameter(site.weight_name)
        branches[site.name] = BypassBranch(
            site.kind, site.in_features, site.out_features,
            resolve_width(site, _option(overrides, site, "width", width)),
            _option(overrides, site, "activation", activation),
            with_bias=site.bias_foldable, homotopy=homotopy, conv=site.conv,
            dtype=weight.dtype, device=weight.device, generator=generator,
            init_scale=init_scale)
    run_pass(insert_extension, gm, chosen, branches, history=("find_sites",))
    config = ExtensionConfig(
        sites=[s.name for s in chosen], widths={n: b.width for n, b in branches.items()},
        families={n: b.family_name for n, b in branches.items()}, seed=seed,
        init_scale=init_scale, escape_scores=scores, selection=selection)
    ext = ExtendedModel(model, traced, gm, table, chosen, branches, homotopy, config)
    if not model.training:
        ext.training = False
    return ext


def extend(model: nn.Module, example_inputs, sites: SiteSpec = "auto", width: Width = 8,
           activation: str = "tanh", *, exclude=(), overrides: Mapping[str, Mapping] | None = None,
           seed: int = 0, probe: Probe | None = None, top_k: int | None = None,
           frontend: str = "auto", traced: TracedModel | None = None,
           init_scale: float = 1.0) -> ExtendedModel:
    """Extend ``model`` with bypass branches ``B·ρ_α(Ax + a)`` (B = 0) at the chosen sites.

    The result computes exactly what ``model`` computes (E1) and shares its Parameters; the
    user's model object is not modified.

    ``sites``: ``"all"``, ``"auto"`` (rank by the escape score ``‖∂L/∂B‖`` on ``probe`` — a
    ``probe(module) -> loss`` closure — or, without one, on a fixed random output direction; keep
    the ``top_k`` best, default half the sites), a name / ``.suffix`` / full-match regex, a list
    of those, or a predicate ``(Site) -> bool``. ``overrides`` maps a site name to
    ``{"width": ..., "activation": ...}``.

    >>> ext = extend(nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1)),
    ...              (torch.randn(16, 4),), sites="all", width=2)
    >>> [s.name for s in ext.sites]
    ['0', '2']
    """
    traced = traced or trace(model, example_inputs, frontend=frontend)
    table = run_pass(find_sites, traced.graph_module).info
    if not table.extendable():
        reasons = "; ".join(f"{s.name}: {s.excluded}" for s in table.values()) or \
            "no nn.Linear / convNd / F.linear / matmul against a parameter in the graph"
        raise SiteError(f"{type(model).__name__} has no extendable site ({reasons})")
    if isinstance(sites, str) and sites == "auto":
        candidates = select_sites(table, "all", exclude)
        full = _build(model, traced, table, candidates, width, activation, overrides, seed,
                      init_scale, "auto")
        scores = escape_scores(full, probe)
        keep = top_k or max(1, math.ceil(len(candidates) / 2))
        ranked = sorted(candidates, key=lambda s: -scores[s.name])[:keep]
        chosen = [s for s in candidates if s in ranked]
        return _build(model, traced, table, chosen, width, activation, overrides, seed,
                      init_scale, "auto", scores)
    chosen = select_sites(table, sites, exclude)
    return _build(model, traced, table, chosen, width, activation, overrides, seed, init_scale,
                  "explicit")


def relative_deviation(reference, other) -> float:
    """``max|a − b| / max|a|`` over all tensor outputs (0 when equal)."""
    ref = [t for t in torch.utils._pytree.tree_leaves(reference) if isinstance(t, torch.Tensor)]
    out = [t for t in torch.utils._pytree.tree_leaves(other) if isinstance(t, torch.Tensor)]
    worst = 0.0
    for a, b in zip(ref, out, strict=True):
        a64, b64 = a.detach().to(torch.float64), b.detach().to(torch.float64)
        scale = float(a64.abs().max()) if a64.numel() else 0.0
        diff = float((a64 - b64).abs().max()) if a64.numel() else 0.0
        worst = max(worst, diff / scale if scale > 0 else diff)
    return worst


def _run(module: nn.Module, inputs: tuple, guard: nn.Module):
    with no_side_effects(guard), torch.no_grad():
        torch.manual_seed(0)
        return module(*inputs)


VERIFY_TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4, torch.bfloat16: 5e-2,
                    torch.float16: 5e-2}  # a safety net against bugs, not the C1 target


def contract(ext: ExtendedModel, *, force: bool = False, verify: bool = True) -> nn.Module:
    """Fold every branch into the user's own Parameters, in place; return the user's model.

    Requires the branches to sit on the constraint set C (``ext.set_homotopy(0.0)`` or the
    Bypass return phase); ``force=True`` snaps onto C and reports the function change that caused
    in ``ext.contraction_report.snap_change``. All-or-nothing: on any failure the user's weights
    are untouched.
    """
    if not isinstance(ext, ExtendedModel):
        raise ContractionError(f"contract needs what morphc.extend returned, got "
                               f"{type(ext).__name__}")
    if ext.contracted:
        raise ContractionError("this extended model was already contracted")
    inputs = ext.traced.example_inputs
    residual = ext.constraint_residual()
    snap_change = None
    if residual != 0.0:
        if not force:
            raise ContractionError(
                f"the branches are off the constraint set (residual {residual:.3g}), so folding "
                "would change the function. Reach C first: ext.set_homotopy(0.0) (or let the "
                "Bypass return phase anneal it), or pass force=True to snap and measure.")
        before = _run(ext, inputs, ext)
        ext.set_homotopy(0.0)
        snap_change = relative_deviation(before, _run(ext, inputs, ext))
    result = run_pass(fold_extension, ext.graph_module, ext.sites, ext.branches,
                      history=("find_sites", "insert_extension"))
    new_values = result.info
    bad = [name for name, value in new_values.items() if not torch.isfinite(value).all()]
    if bad:
        raise ContractionError(f"folding gives non-finite values in {bad}; the user's weights "
                               "were left untouched. Check the extension parameters for NaN/Inf.")
    reference = _run(ext, inputs, ext) if verify else None
    params = {name: ext.graph_module.get_parameter(name) for name in new_values}
    saved = {name: p.detach().clone() for name, p in params.items()}
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(new_values[name].to(param.dtype))
    deviation = None
    if verify:
        deviation = relative_deviation(reference, _run(result.graph_module, inputs, ext))
        tolerance = VERIFY_TOLERANCE.get(next(iter(params.values())).dtype, 1e-2)
        if not deviation <= tolerance:
            with torch.no_grad():
                for name, param in params.items():
                    param.copy_(saved[name])
            raise ContractionError(
                f"the folded model deviates from the extended one by {deviation:.3g} "
                f"(> {tolerance:g}); weights restored. This is a morphc bug: please report it.")
    ext.contracted = True
    ext.contraction_report = ContractionReport(list(new_values), deviation, snap_change,
                                               residual)
    ext.contracted_graph_module = result.graph_module
    return ext.model
