"""``ExtendedModel``: the user's model with bypass branches, as one ``nn.Module``."""

from __future__ import annotations

import copy
import numbers
from dataclasses import dataclass, field

import torch
from torch import fx, nn

from morphc.compiler.shape_graphs import DEFAULT_RETRACES, Retrace, ShapeGraphs
from morphc.errors import ContractionError, FormatError, ShapeError, TraceError
from morphc.ir.sites import Site, SiteTable
from morphc.ir.tags import restore_tags, tags_by_name
from morphc.ir.traced_model import TracedModel
from morphc.passes.infra import Pipeline


class HomotopyError(ContractionError, ValueError):
    """``set_homotopy`` off [0, 1]: a morphc error, and the ValueError it always was."""


def check_homotopy(s) -> float:
    """``s`` as a float in [0, 1] (a one-element floating tensor too), else ``HomotopyError``;
    shared with the model-space ``set_homotopy`` of grown branches."""
    if isinstance(s, torch.Tensor) and s.numel() == 1 and s.is_floating_point():
        s = s.item()
    if isinstance(s, bool) or not isinstance(s, numbers.Real) or not 0.0 <= s <= 1.0:
        raise HomotopyError(f"homotopy must be a number in [0, 1] (1: the free "
                            f"non-linearity, 0: on the constraint set), got {s!r}")
    return float(s)


@dataclass
class ExtensionConfig:
    """How an extension was made, so it can be made again identically (e.g. on every DDP rank)."""

    sites: list[str]
    widths: dict[str, int]
    families: dict[str, str]
    seed: int
    init_scale: float = 1.0
    escape_scores: dict[str, float] | None = None
    selection: str = "all"
    # extra graphs for shapes the first trace refuses; None: 8 when morphc chose the dynamic
    # dimensions, 0 when the user passed dynamic_shapes (their spec is their decision)
    max_retraces: int | None = None


@dataclass
class ContractionReport:
    """What a contraction did: parameters written, measured deviation, any forced snap."""

    parameters: list[str]
    deviation: float | None
    snap_change: float | None = None
    residual_before: float = 0.0
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        text = f"folded {len(self.parameters)} parameters; max relative deviation {self.deviation}"
        if self.snap_change is not None:
            text += f"; forced snap onto C changed the output by {self.snap_change:.3g}"
        return text


DtypeDevice = tuple[torch.dtype, torch.device]


def converted_like(tree, was: DtypeDevice, now: DtypeDevice):
    """The tensors of ``tree`` converted as a model was converted from ``was`` to ``now``
    (``model.double()``, ``model.to(device)``): a floating tensor of the old dtype takes the
    new one, a tensor on the old device moves; integer inputs (token ids) keep their dtype."""
    if was == now:
        return tree
    (old_dtype, old_device), (dtype, device) = was, now

    def convert(t: torch.Tensor) -> torch.Tensor:
        if t.is_floating_point() and t.dtype == old_dtype:
            t = t.to(dtype)
        return t.to(device) if t.device == old_device else t

    return torch.utils._pytree.tree_map_only(torch.Tensor, convert, tree)


def floating_dtype_device(model: nn.Module) -> DtypeDevice | None:
    """The dtype and device of the model's first floating parameter (None: it has none)."""
    return next(((p.dtype, p.device) for p in model.parameters() if p.is_floating_point()),
                None)


def public_alias(name: str, what: str) -> property:
    """``ext.<name>``, the public spelling of ``ext.extension_<name>``, which morphc itself
    reads: the view Bypass gives a closure answers ``m.<name>`` with the user's model's own
    attribute of that name (:mod:`morphc.runtime.user_attributes`)."""
    return property(lambda self: getattr(self, f"extension_{name}"),
                    doc=f"{what[0].upper()}{what[1:]} (``extension_{name}``).")


class ExtendedModel(nn.Module):
    """The extended graph. Calling it computes ``model(x)`` plus every branch.

    The graph module holds the user's own Parameter objects, so training this module trains the
    user's model; ``extension_parameters()`` are the only new ones. A call with a shape the
    graph refuses although the eager model takes it traces the model again at that shape, with
    the same branches (:mod:`morphc.compiler.shape_graphs`; each listed in ``retraces``).
    """

    def __init__(self, model: nn.Module, traced: TracedModel, pipeline: Pipeline,
                 site_table: SiteTable, sites: list[Site], branches: dict[str, nn.Module],
                 homotopy: torch.Tensor, config: ExtensionConfig) -> None:
        super().__init__()
        self.graph_module = pipeline.graph_module
        self.extension_pipeline = pipeline     # the passes that made graph_module, in order
        object.__setattr__(self, "_model", model)   # the user's object, not a submodule
        object.__setattr__(self, "extension_branches", dict(branches))
        self.extension_traced, self.site_table, self.extension_sites = traced, site_table, sites
        self.extension_config = config
        self.register_buffer("_homotopy", homotopy, persistent=False)
        self.contracted = False
        self.contraction_report: ContractionReport | None = None
        self.contracted_graph_module: fx.GraphModule | None = None
        limit = config.max_retraces
        if limit is None:
            limit = 0 if traced.dynamic_shapes is not None else DEFAULT_RETRACES
        self.shape_graphs = ShapeGraphs(limit)
        weight = self.graph_module.get_parameter(sites[0].weight_name) if sites else homotopy
        self._extended_as = (weight.dtype, weight.device)

    config = public_alias("config", "the extension's settings (ExtensionConfig)")
    sites = public_alias("sites", "the extended sites (Site), in graph order")
    branches = public_alias("branches", "each site's branch by site name")
    traced = public_alias("traced", "the user's model as traced (TracedModel)")
    pipeline = public_alias("pipeline", "the passes that made graph_module, in order")

    def example_call(self) -> tuple[tuple, dict]:
        """The example inputs (args, kwargs), converted as the model was since extend: after
        ``ext.double()`` / ``model.to(device)`` the traced examples would no longer fit it. A
        floating tensor of the site weights' old dtype takes their new one; a tensor on their old
        device moves to the new one."""
        sites, traced = self.extension_sites, self.extension_traced
        weight = self.graph_module.get_parameter(sites[0].weight_name) if sites \
            else self._homotopy
        return converted_like((tuple(traced.example_inputs), dict(traced.example_kwargs)),
                              self._extended_as, (weight.dtype, weight.device))

    def __reduce_ex__(self, protocol):
        """``torch.save(ext)`` / pickle. torch.export's graph modules do not pickle (closures in
        their hooks): refuse that clearly, naming what does work."""
        if self.extension_traced.frontend == "export":
            raise FormatError(
                "an extended model traced by torch.export cannot be pickled (torch.save(ext)): "
                "torch's exported modules do not pickle. Save ext.state_dict() (and your "
                "model's), then morphc.extend the model again with the same settings and "
                "ext.load_state_dict(...)")
        return super().__reduce_ex__(protocol)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_node_tags": tags_by_name(self.graph_module)}

    def __setstate__(self, state: dict) -> None:
        """A pickled GraphModule comes back without node meta: its tags (which nodes are a
        site, a branch, its add) are what the fold needs to find."""
        tags = state.pop("_node_tags", {})
        for name in ("config", "sites", "branches", "traced", "pipeline"):  # pickled before
            if name in state:                                 # morphc read extension_<name>
                state.setdefault(f"extension_{name}", state.pop(name))
        super().__setstate__(state)
        restore_tags(self.graph_module, tags)

    def __deepcopy__(self, memo):
        """The usual deep copy (also of the user's model, so a copy never folds into the
        original), spelled out because :meth:`__reduce_ex__` refuses exported graphs."""
        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        new.__dict__.update(copy.deepcopy(self.__dict__, memo))
        return new

    @property
    def retraces(self) -> list[Retrace]:
        """Each extra graph traced for a shape the first one refused, with its cost."""
        return self.shape_graphs.retraces

    def mark_contracted(self, report: ContractionReport, graph_module: fx.GraphModule) -> None:
        """Called by ``morphc.contract`` once the fold is written: this module is spent."""
        self.contracted, self.contraction_report = True, report
        self.contracted_graph_module = graph_module

    @property
    def model(self) -> nn.Module:
        """The user's model object (what ``morphc.contract`` returns)."""
        return self._model

    def forward(self, *args, **kwargs):
        if self.contracted:
            raise ContractionError(
                "this extended model was contracted: its branches now live in the user's weights; "
                "call the model that morphc.contract returned"
            )
        traced = self.extension_traced
        if traced.frontend == "export" and self.training != traced.training:
            return self.shape_graphs.call_in_mode(self, args, kwargs)   # dropout/BN baked in
        try:
            return traced.call(self.graph_module, args, kwargs)
        except ShapeError as error:   # refused before any computation: try a graph that fits
            return self.shape_graphs.call(self, args, kwargs, error)
        except RuntimeError as error:
            apart = self._converted_apart()
            if apart is not None:
                raise TraceError(apart) from error
            raise

    def _converted_apart(self) -> str | None:
        """Why the call failed, when the user's model was converted without its extension
        (``model.double()`` / ``model.to(device)`` after ``extend``): the branches kept the
        old dtype or device, and torch's error would only name two mismatched tensors."""
        if not self.extension_sites or not self.extension_branches:
            return None
        weight = self.graph_module.get_parameter(self.extension_sites[0].weight_name)
        branch = next(iter(self.extension_branches.values())).A
        if (weight.dtype, weight.device) == (branch.dtype, branch.device):
            return None
        return (f"the model's weights are {weight.dtype} on {weight.device} but its extension's "
                f"are {branch.dtype} on {branch.device}: the model was converted after "
                "morphc.extend. Convert the extended model instead (ext.double(), ext.to(...)), "
                "which converts both, or extend the converted model again")

    def extension_parameters(self):
        """The new parameters only (A, a, B, α of every branch)."""
        for branch in self.extension_branches.values():
            yield from branch.parameters()

    def named_extension_parameters(self):
        for name, branch in self.extension_branches.items():
            for pname, param in branch.named_parameters():
                yield f"{name}.{pname}", param

    def set_homotopy(self, s: float) -> None:
        """1.0: free non-linearity; 0.0: on the constraint set C. Updated in place, so compiled
        graphs are not recaptured."""
        s = check_homotopy(s)
        with torch.no_grad():
            self._homotopy.fill_(s)

    @property
    def homotopy(self) -> float:
        return float(self._homotopy)

    def constraint_residual(self) -> float:
        """Largest violation of the constraint equations over all branches; 0.0 when contraction
        is exact."""
        with torch.no_grad():
            values = [float(b.constraint_residual()) for b in self.extension_branches.values()]
        return max(values, default=0.0)

    def train(self, mode: bool = True):
        """Also for an exported graph, which bakes dropout and BatchNorm in the mode it was
        captured in: a call in the other mode runs a graph exported in that mode, with the same
        branches (:meth:`ShapeGraphs.call_in_mode`)."""
        if self.extension_traced.frontend == "export":
            for module in [self, *self.extension_branches.values(),
                           *(gm for _, gm in self.shape_graphs.graphs)]:
                module.training = mode
            return self
        return super().train(mode)

    def _apply(self, fn, recurse=True):
        """``.to()`` / ``.double()`` make new tensors; keep one homotopy shared by all branches."""
        super()._apply(fn, recurse)
        self.shape_graphs.apply(fn)
        for branch in self.extension_branches.values():
            branch.homotopy = self._homotopy
        return self

    def extra_repr(self) -> str:
        homotopy = "meta" if self._homotopy.device.type == "meta" else self.homotopy
        return (f"frontend={self.extension_traced.frontend}, "
                f"sites={[s.name for s in self.extension_sites]}, homotopy={homotopy}")


# set (True) on an in-place extension (``morphc.integrations``' ``InPlaceExtension``) and on the
# forward hooks it puts on a model's site modules, so the layers below it can recognise both
IN_PLACE_MARK = "_morphc_in_place_extension"


def already_extended(model, entry: str) -> str | None:
    """Why ``model`` is no model for ``entry`` (``"morphc.extend"``, ``"Bypass"``) to extend,
    with what to pass instead; None when it is one. Extending an extension would also extend its
    branches (their ``B`` is a linear site) and make its site names ``graph_module.*``; branches
    hooked on in place would be traced into the graph and stay there after they are folded."""
    if getattr(model, IN_PLACE_MARK, False):
        return (f"{entry} got an in-place extension (bypass branches a trainer callback hooked "
                "onto a model), not a model: once it is folded (ext.fold()) or removed "
                "(ext.remove()) pass its model, ext.model")
    if not isinstance(model, nn.Module):
        return None
    if isinstance(model, ExtendedModel):
        if model.contracted:
            return (f"{entry} got an ExtendedModel that morphc.contract already folded: its "
                    "branches live in the user's weights now; pass the model contract "
                    "returned (ext.model)")
        return (f"{entry} got a model that is already extended (a morphc ExtendedModel): pass "
                "the model it extends, ext.model, to start afresh, or morphc.contract(ext) "
                "first to keep what the branches learned and pass the model it returns")
    inner = [name for name, m in model.named_modules() if isinstance(m, ExtendedModel)]
    if inner:
        return (f"{entry} got a {type(model).__name__} whose submodule {inner[0]!r} is a morphc "
                "ExtendedModel: put the model it extends there instead (ext.model; after "
                "morphc.contract(ext) to keep what its branches learned)")
    hooked = [name or "(the model)" for name, m in model.named_modules()
              if any(getattr(h, IN_PLACE_MARK, False) for h in m._forward_hooks.values())]
    if hooked:
        return (f"{entry} got a {type(model).__name__} with bypass branches hooked onto "
                f"{hooked} in place (a trainer callback's cycle in flight): they would be "
                "traced into the graph and stay there after they are folded or removed; resolve "
                "the cycle first (callback.bypass.resolve(reason), or after training)")
    return None
