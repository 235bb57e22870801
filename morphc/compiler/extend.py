"""``morphc.extend``: insert bypass branches (B = 0) at the chosen sites; nothing changes (E1)."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import nn

from morphc.compiler.escape import Probe, escape_scores, rank_sites
from morphc.compiler.extended import ExtendedModel, ExtensionConfig, already_extended
from morphc.errors import SiteError, TraceError
from morphc.families import get_family
from morphc.ir.branch import BypassBranch
from morphc.ir.sites import Site, SiteSpec, select_sites
from morphc.ir.trace import trace
from morphc.ir.traced_model import TracedModel
from morphc.passes.find_sites import find_sites
from morphc.passes.infra import Pipeline
from morphc.passes.insert_extension import insert_extension

Width = int | float


def check_width(width: Width, where: str = "width") -> None:
    """An int unit count or a float fraction in (0, 1] of the site's output size."""
    if isinstance(width, bool) or not isinstance(width, int | float) or \
            not math.isfinite(width) or width <= 0 or isinstance(width, float) and width > 1:
        raise SiteError(f"{where} must be a positive int (units) or a float fraction in (0, 1] "
                        f"of the site's output size, got {width!r}")


def resolve_width(site: Site, width: Width) -> int:
    """An int is a unit count; a float in (0, 1] a fraction of the site's output size. Convs
    round up to a multiple of ``groups`` so the branch can be grouped like the site."""
    check_width(width)
    if isinstance(width, float):
        units = max(1, round(width * site.out_features))
    else:
        units = width
    return int(math.ceil(units / site.groups) * site.groups)


OVERRIDE_KEYS = ("width", "activation")


def check_override_settings(overrides: Mapping[str, Mapping] | None) -> None:
    """Each override sets only a valid ``width`` and a known ``activation``: a typo would
    otherwise be ignored in silence (checkable before the model is traced)."""
    if overrides is None:
        return
    if not isinstance(overrides, Mapping):
        raise SiteError(f"overrides must map a site name to {{'width': ..., 'activation': ...}}"
                        f", got {type(overrides).__name__}")
    for name, values in overrides.items():
        if not isinstance(values, Mapping) or set(values) - set(OVERRIDE_KEYS):
            raise SiteError(f"overrides[{name!r}] must be a mapping with keys among "
                            f"{list(OVERRIDE_KEYS)}, got {values!r}")
        if "width" in values:
            check_width(values["width"], f"overrides[{name!r}]['width']")
        if "activation" in values:
            get_family(values["activation"])


def check_overrides(overrides: Mapping[str, Mapping] | None, table) -> None:
    """:func:`check_override_settings`, and every override names a site of ``table`` (by name
    or weight name)."""
    check_override_settings(overrides)
    known = {n for site in table.values() for n in (site.name, site.weight_name) if n}
    for name in overrides or {}:
        if name not in known:
            raise SiteError(f"overrides names {name!r}, which is no site of this model; sites: "
                            f"{[site.name for site in table.values()]}")


def _option(overrides: Mapping[str, Mapping] | None, site: Site, key: str, default):
    for pattern, values in (overrides or {}).items():
        if pattern in (site.name, site.weight_name) and key in values:
            return values[key]
    return default


def _build(model, traced, analysed: Pipeline, table, chosen, width, activation, overrides, seed,
           init_scale, selection, scores=None, max_retraces: int | None = None) -> ExtendedModel:
    pipeline = analysed.fork()
    gm = pipeline.graph_module
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
    pipeline.run(insert_extension, chosen, branches)
    config = ExtensionConfig(
        sites=[s.name for s in chosen], widths={n: b.width for n, b in branches.items()},
        families={n: b.family_name for n, b in branches.items()}, seed=seed,
        init_scale=init_scale, escape_scores=scores, selection=selection,
        max_retraces=max_retraces)
    ext = ExtendedModel(model, traced, pipeline, table, chosen, branches, homotopy, config)
    if not model.training:
        ext.training = False
    return ext


@torch.inference_mode(False)   # tensors made under inference_mode could never be trained
def extend(model: nn.Module, example_inputs=None, sites: SiteSpec = "auto", width: Width = 8,
           activation: str = "tanh", *, kwargs: Mapping | None = None, dynamic_shapes=None,
           exclude=(), overrides: Mapping[str, Mapping] | None = None,
           seed: int = 0, probe: Probe | None = None, top_k: int | None = None,
           frontend: str = "auto", traced: TracedModel | None = None,
           init_scale: float = 1.0, max_retraces: int | None = None) -> ExtendedModel:
    """Extend ``model`` with bypass branches ``B·ρ_α(Ax + a)`` (B = 0) at the chosen sites.

    The result computes exactly what ``model`` computes (E1) and shares its Parameters; the
    user's model object is not modified.

    ``sites``: ``"all"``, ``"auto"`` (rank by the escape score ``‖∂L/∂B‖`` on ``probe`` — a
    ``probe(module) -> loss`` closure — or, without one, on a fixed random output direction; keep
    the ``top_k`` best, default half the sites), a name / ``.suffix`` / full-match regex, a list
    of those, or a predicate ``(Site) -> bool``. A frozen weight (``requires_grad=False``) is
    only extended when named explicitly (its name or ``.suffix``). ``overrides`` maps a site name to
    ``{"width": ..., "activation": ...}``.

    Inputs are given as torch.export takes them: ``example_inputs`` the positional ones,
    ``kwargs`` the keyword ones (``attention_mask=``, ``use_cache=False``), ``dynamic_shapes``
    torch.export's own spec (default: every dimension of every tensor input may vary, and
    ``ext.traced.specialised`` says which ones the model fixed and why). Traces are cached per
    model and input signature. Called with a shape that graph refuses but the eager model
    takes (export fixed or guarded a size the model lets vary), the extended model traces the
    model again at that shape with the same branches, at most ``max_retraces`` times (default 8,
    or 0 when ``dynamic_shapes`` is given: that spec's static dimensions are taken as meant;
    each re-trace is warned about and listed in ``ext.retraces``); past that, or when the model
    itself refuses the shape, the call raises ``ShapeError`` naming the input and dimension.

    >>> ext = extend(nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1)),
    ...              (torch.randn(16, 4),), sites="all", width=2)
    >>> [s.name for s in ext.sites]
    ['0', '2']
    """
    refused = already_extended(model, "morphc.extend")
    if refused:
        raise TraceError(refused)
    if isinstance(model, nn.Module) and any(
            t.device.type == "meta" for t in [*model.parameters(), *model.buffers()]):
        raise TraceError(f"{type(model).__name__} is on the meta device (no values to trace, "
                         "check or fold); materialise it first: model.to_empty(device='cpu') "
                         "and load its weights")
    traced = traced or trace(model, example_inputs, frontend=frontend, kwargs=kwargs,
                             dynamic_shapes=dynamic_shapes)
    frozen = [n for n, p in traced.graph_module.named_parameters() if not p.requires_grad]
    analysed = Pipeline(traced.graph_module)
    table = analysed.run(find_sites).analysis
    if not table.extendable():
        raise SiteError(f"{type(model).__name__} has no extendable site: {table.explain()}")
    check_overrides(overrides, table)
    if isinstance(sites, str) and sites == "auto":
        candidates = select_sites(table, "all", exclude, frozen)
        full = _build(model, traced, analysed, table, candidates, width, activation, overrides,
                      seed, init_scale, "auto")
        scores = escape_scores(full, probe)
        best = set(rank_sites(scores, top_k))
        chosen = [s for s in candidates if s.name in best]
        return _build(model, traced, analysed, table, chosen, width, activation, overrides, seed,
                      init_scale, "auto", scores, max_retraces)
    chosen = select_sites(table, sites, exclude, frozen)
    return _build(model, traced, analysed, table, chosen, width, activation, overrides, seed,
                  init_scale, "explicit", max_retraces=max_retraces)
