"""Moves between architectures that keep the function: the edges of a ``ModelSpace``.

A move maps ``(module, example_inputs)`` to a *new* module (the input is never modified) that
computes the same function at the moment it is applied:

- ``Extend`` / ``Contract``: the temporary Bypass pair (``morphc.extend`` / ``morphc.contract``);
- ``Grow``: keep an extension for good — its branches become ordinary submodules;
- ``Ungrow`` (alias ``Shrink``): fold grown branches back into their sites, when on C;
- ``Deepen``: insert an identity-initialised residual block ``x + B·ρ(Ax + a)``, ``B = 0``;
- ``Widen``: Net2Net widening of the hidden layer between two sites.

Architectures are ``torch.fx.GraphModule`` objects (or an ``ExtendedModel`` between ``Extend`` and
``Contract``/``Grow``), so every result has readable code (``gm.code``). Each move rewrites a
private working copy (``morphc.space.move_base``).

>>> from morphc import zoo
>>> model, inputs = zoo.mlp()
>>> wide = Widen("0", to=48)(model, inputs)
>>> wide.get_submodule("0").out_features, wide.get_submodule("2").in_features
(48, 48)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import TensorMetadata

from morphc.compiler.contract import contract
from morphc.compiler.extend import extend
from morphc.compiler.extended import ExtendedModel, check_homotopy
from morphc.compiler.write import write_weights
from morphc.errors import ContractionError, MoveError, SiteError
from morphc.ir.branch import BypassBranch
from morphc.ir.sites import ConvConfig
from morphc.ir.tags import DEEP_PREFIX
from morphc.passes.find_grown_branches import GrownBranch, find_grown_branches
from morphc.passes.infra import Pipeline, fresh_name
from morphc.passes.insert_residual_block import insert_residual_block
from morphc.passes.make_permanent import make_permanent
from morphc.passes.remove_branch import remove_branch
from morphc.passes.widen_layer import SITES, widen_layer, widenable_pairs
from morphc.space.deepen_points import deepen_points, tensor_layout, why_unread
from morphc.space.move_base import Move, as_traced


def set_homotopy(module: nn.Module, s: float) -> None:
    """Move every bypass branch (temporary or grown) along its homotopy: 1 free, 0 on C.

    Changing ``s`` changes the function unless the branches are already affine; anneal it while
    training (as the Bypass return phase does) before ``Contract`` / ``Ungrow``.
    """
    if isinstance(module, ExtendedModel):
        module.set_homotopy(s)
        return
    s = check_homotopy(s)     # a NaN or 2.0 would silently change what the branches compute
    with torch.no_grad():
        for branch in module.modules():
            if isinstance(branch, BypassBranch):
                branch.homotopy.fill_(s)


def _need_graph(module: nn.Module, move: str) -> fx.GraphModule:
    if isinstance(module, ExtendedModel):
        raise MoveError(f"{move} needs a standalone architecture, but this one is extended: "
                        "apply Contract (back to the original) or Grow (keep the branches) first")
    return module


# -- moves --------------------------------------------------------------------------------------
@dataclass
class Extend(Move):
    """Temporary bypass branches (``morphc.extend``); undo: ``Contract``; keep: ``Grow``."""

    sites: str | list[str] = "auto"
    width: int = 8
    activation: str = "tanh"
    seed: int = 0

    def apply_to(self, module, inputs):
        gm = _need_graph(module, "Extend")
        return extend(gm, inputs, self.sites, self.width, self.activation, seed=self.seed,
                      kwargs=inputs.kwargs, traced=as_traced(gm, inputs))


@dataclass
class Contract(Move):
    """Fold an extension back (``morphc.contract``); needs the branches on C."""

    def apply_to(self, module, inputs):
        if not isinstance(module, ExtendedModel):
            raise MoveError("Contract needs an extended architecture (the result of Extend); "
                            "to remove grown branches use Ungrow")
        # contract returns the model Extend was given, in the mode it had then (the parent's
        # mode at that time); the architecture it leads to computes in the extended one's mode
        return contract(module).train(module.training)


@dataclass
class Grow(Move):
    """Make an extension permanent: branches become submodules ``morphc_grown.at_<site>``.

    On an extended architecture it keeps its (trained) branches; on a standalone one it extends
    ``sites`` first (``B = 0``) and keeps those branches.
    """

    sites: str | list[str] = "all"
    width: int = 8
    activation: str = "tanh"
    seed: int = 0

    def apply_to(self, module, inputs):
        if not isinstance(module, ExtendedModel):
            module = extend(module, inputs, self.sites, self.width, self.activation,
                            seed=self.seed, kwargs=inputs.kwargs,
                            traced=as_traced(module, inputs))
        return _make_permanent(module)


def _make_permanent(ext: ExtendedModel) -> fx.GraphModule:
    """The extended graph as a standalone architecture (the ``make_permanent`` pass)."""
    pipeline = Pipeline(ext.graph_module, tuple(ext.extension_pipeline.history))
    pipeline.run(make_permanent)
    pipeline.graph_module.train(ext.training)
    return pipeline.graph_module


@dataclass
class Deepen(Move):
    """Insert ``x + B·ρ(Ax + a)`` (B = 0) on the activation tensor named ``at`` (an fx node name;
    None: the last activation). ``kind``: "linear" (features last), "conv" (channels on dim 1) or
    "auto" (from the tensor's rank / the op that produced it)."""

    at: str | None = None
    width: int | None = None
    activation: str = "prelu"
    kind: str = "auto"
    seed: int = 0

    def apply_to(self, module, inputs):
        gm = _need_graph(module, "Deepen")
        if self.width is not None and (type(self.width) is not int or self.width < 1):
            raise MoveError(f"Deepen: width must be a positive int or None (as many units as "
                            f"channels), got {self.width!r}")
        if self.kind not in ("auto", "linear", "conv"):
            raise MoveError(f"Deepen: kind must be 'auto', 'linear' or 'conv', got {self.kind!r}")
        points = deepen_points(gm)
        at = self.at if self.at is not None else (points[-1] if points else None)
        node = next((n for n in gm.graph.nodes if n.name == at), None)
        if node is None or "tensor_meta" not in node.meta:
            raise SiteError(f"cannot deepen at {at!r}: no such tensor node; activation "
                            f"tensors: {points}")
        meta = node.meta["tensor_meta"]
        if not isinstance(meta, TensorMetadata) or not meta.dtype.is_floating_point:
            what = meta.dtype if isinstance(meta, TensorMetadata) else type(meta).__name__
            raise SiteError(f"cannot deepen at {at!r}: a residual block needs one "
                            f"floating-point tensor, {at} is {what}; activation tensors: "
                            f"{points}")
        unread = why_unread(gm, node)
        if unread is not None:
            raise SiteError(f"cannot deepen at {at!r}: {unread}, so a block there would not "
                            f"change what the model computes; activation tensors: {points}")
        kind, dim = tensor_layout(gm, node, self.kind)
        channels = int(meta.shape[-1] if kind == "linear" else meta.shape[1])
        conv = ConvConfig(dim, (3,) * dim, (1,) * dim, (1,) * dim, (1,) * dim, 1) \
            if kind == "conv" else None
        device = next(gm.parameters(), torch.empty(0)).device
        block = BypassBranch(kind, channels, channels, self.width or channels, self.activation,
                             with_bias=True, homotopy=torch.ones((), device=device),
                             conv=conv, dtype=meta.dtype, device=device,
                             generator=torch.Generator().manual_seed(self.seed))
        target = fresh_name(gm, DEEP_PREFIX, "block")
        return Pipeline(gm).run(insert_residual_block, node.name, block, target).graph_module


@dataclass
class Widen(Move):
    """Net2Net widening of module ``first``'s output units to ``to`` (or ``factor`` × width),
    with BatchNorm in between widened alike and the consumer's weights split among the copies.
    ``noise`` randomises the split (symmetry breaking that keeps the function)."""

    first: str
    to: int | None = None
    factor: float = 2.0
    noise: float = 0.05
    seed: int = 0
    second: str | None = None

    def apply_to(self, module, inputs):
        gm = _need_graph(module, "Widen")
        self._check_arguments()
        try:
            site = gm.get_submodule(self.first)
        except AttributeError:
            site = None
        if not isinstance(site, SITES):
            raise SiteError(f"cannot widen {self.first!r}: not an nn.Linear/ConvNd module; "
                            f"widenable (first, second) pairs: {widenable_pairs(gm)}")
        old = site.weight.shape[0]
        new = self.to if self.to is not None else math.ceil(old * self.factor)
        if new <= old:
            given = f"to={self.to}" if self.to is not None else \
                f"factor={self.factor} gives {new} units"
            raise SiteError(f"Widen: {self.first} has {old} units and {given}; Widen only adds "
                            f"units, so the new width must be larger: pass to > {old} or "
                            "factor > 1")
        generator = torch.Generator().manual_seed(self.seed)
        return Pipeline(gm).run(widen_layer, self.first, new, second=self.second,
                                noise=self.noise, generator=generator).graph_module

    def _check_arguments(self) -> None:
        """Refuse what would crash mid-pass or quietly break the function (a NaN noise makes
        every split λ NaN)."""
        if self.to is not None and (type(self.to) is not int or self.to < 1):
            raise MoveError(f"Widen: to must be a positive int (units), got {self.to!r}")
        if not (_is_real(self.factor) and math.isfinite(self.factor) and self.factor > 0):
            raise MoveError(f"Widen: factor must be a finite number > 0, got {self.factor!r}")
        if not (_is_real(self.noise) and math.isfinite(self.noise) and self.noise >= 0):
            raise MoveError(f"Widen: noise must be a finite number ≥ 0, got {self.noise!r}")


def _is_real(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


# -- grown branches and their removal ----------------------------------------------------------
def grown_branches(gm: fx.GraphModule) -> list[GrownBranch]:
    return find_grown_branches(gm).analysis


def _removable(gm: fx.GraphModule, branch: GrownBranch) -> str | None:
    """Why ``branch`` cannot be removed exactly right now (None: it can)."""
    module = branch.module(gm)
    if not bool(torch.any(module.B != 0)):
        return None
    if branch.site is None:
        return (f"residual block {branch.target} has B ≠ 0 and no weight to fold into; it can "
                "only be removed while B = 0")
    with torch.no_grad():
        residual = float(module.constraint_residual())
    if residual != 0.0:
        return (f"grown branch {branch.target} is off the constraint set (residual "
                f"{residual:.3g}); anneal it to C while training (set_homotopy(module, s) with "
                "s → 0) before Ungrow")
    return None


@dataclass
class Ungrow(Move):
    """Remove grown branches exactly (alias ``Shrink``): fold site branches on C into their
    site's weights; drop residual blocks whose ``B`` is zero. ``branch``: a branch path or site
    name; None removes every branch that can be removed exactly (at least one)."""

    branch: str | None = None

    def apply_to(self, module, inputs):
        gm = _need_graph(module, "Ungrow")
        branches = grown_branches(gm)
        chosen = [b for b in branches if self.branch in (None, b.target, b.site)]
        if not branches:
            raise SiteError("Ungrow: this architecture has no grown branches or residual blocks "
                            "(Grow and Deepen add them; Contract undoes Extend)")
        if not chosen:
            raise SiteError(f"no grown branch {self.branch!r}; grown branches: "
                            f"{[(b.target, b.site) for b in branches]}")
        reasons = {b.target: _removable(gm, b) for b in chosen}
        if self.branch is None:
            chosen = [b for b in chosen if reasons[b.target] is None] or chosen
        blocked = [reasons[b.target] for b in chosen if reasons[b.target] is not None]
        if blocked:
            raise ContractionError("; ".join(blocked))
        for target in [b.target for b in chosen]:     # one at a time: a site may have several
            gm = _fold_branch(gm, next(b for b in grown_branches(gm) if b.target == target))
        return gm


Shrink = Ungrow


def _fold_branch(gm: fx.GraphModule, branch: GrownBranch) -> fx.GraphModule:
    """Remove one grown branch (``remove_branch``) and write its fold all-or-nothing; ``gm`` is
    the move's private copy, discarded on failure."""
    new_values = Pipeline(gm).run(remove_branch, branch).analysis
    params = {name: gm.get_parameter(name) for name in new_values}
    write_weights(params, new_values, what=f"folding {branch.target}")
    return gm


_DROPOUT_FUNCTIONS = {torch.nn.functional.dropout, torch.dropout, torch.nn.functional.dropout1d,
                      torch.nn.functional.dropout2d, torch.nn.functional.dropout3d,
                      torch.nn.functional.alpha_dropout, torch.nn.functional.feature_alpha_dropout}


def _is_dropout(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        return isinstance(module, nn.modules.dropout._DropoutNd) and module.p > 0
    if node.op == "call_function" and node.target in _DROPOUT_FUNCTIONS:
        p = node.kwargs.get("p", node.args[1] if len(node.args) > 1 else 0.5)
        return not isinstance(p, int | float) or p > 0
    return False


def dropout_between(gm: fx.GraphModule, first: str, second: str) -> bool:
    """Whether a dropout with ``p > 0`` lies on a path from module ``first`` to ``second``.
    Widening across it changes the train-mode function (the copied units draw independent masks),
    so no tolerance can make such a move exact."""
    start = next(n for n in gm.graph.nodes if n.op == "call_module" and n.target == first)
    stack = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == second]
    seen: set[fx.Node] = set()
    while stack:
        node = stack.pop()
        for parent in node.all_input_nodes:
            if parent is start or parent in seen:
                continue
            seen.add(parent)
            if _is_dropout(gm, parent):
                return True
            stack.append(parent)
    return False
