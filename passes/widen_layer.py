"""Widening pass: Net2Net-style, function-preserving widening of the hidden layer between two sites.

For ``h = φ(site1(x))`` feeding ``y = site2(h)`` (φ a chain of per-unit ops: activations, dropout,
BatchNorm, pooling, a spatial mean, a flatten of the trailing dims), widening from ``n`` to ``m``
units picks a map ``g: {0..m-1} → {0..n-1}`` (identity on the first ``n``, then copies) and sets::

    W1'[j] = W1[g(j)]        b1'[j] = b1[g(j)]        BN'[j] = BN[g(j)]      # copy unit g(j)
    W2'[:, j] = λ_j · W2[:, g(j)]        with  Σ_{j: g(j)=u} λ_j = 1         # split its output

Copies compute the same value, so ``y`` is unchanged for every input. ``noise`` perturbs the split
(``λ_j = (1 + ε_j)/n_u`` with ``ε`` centred per unit), which breaks the copies' symmetry yet keeps
``Σ λ_j = 1``: the function is still preserved. Perturbing the *incoming* weights would not be.

Before (``nn.Linear(64, 8) → ReLU → nn.Linear(8, 10)``) and after ``widen_layer(gm, "0", 12)``::

    _0 = getattr(self, "0")(x);  _1 = getattr(self, "1")(_0);  _2 = getattr(self, "2")(_1)
    # same code; modules "0" and "2" are now Linear(64, 12) and Linear(12, 10)

The pass needs ``node.meta['tensor_meta']`` (run ``ShapeProp`` first) and rewrites ``gm`` in place
(new submodules at the same paths); ``analysis`` is a :class:`WidenInfo`.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field

import torch
from morphc.passes.infra import PassResult
from torch import fx, nn

from morphc.errors import SiteError
from morphc.ir.branch import BypassBranch
from morphc.ir.ops import (
    CHANNEL_FUNCTIONS,
    CHANNEL_MODULES,
    ELEMENTWISE_FUNCTIONS,
    ELEMENTWISE_METHODS,
    ELEMENTWISE_MODULES,
    LINEAR_MODULES,
    NORMS,
)
from morphc.ir.widening import split_weights, unit_map, widen_branch, widen_in, widen_out

SITES = LINEAR_MODULES


@dataclass
class WidenInfo:
    """What the pass did: which modules, old → new width, the unit map g and the split λ."""

    first: str
    second: str
    norms: list[str]
    old_width: int
    new_width: int
    mapping: list[int] = field(default_factory=list)
    split: list[float] = field(default_factory=list)


@dataclass
class _Chain:
    """The path from site1 to site2 and how the widened units sit in site2's input."""

    first: fx.Node
    second: fx.Node
    norms: list[fx.Node]
    norm_blocks: dict[fx.Node, int]
    block: int        # features per unit in site2's input (> 1 after flattening a spatial map)
    unit: int         # the units' dimension in site2's input
    ndim: int         # rank of site2's input
    # bypass branches around the layer, with the block factor where they sit
    split_in: dict[fx.Node, int] = field(default_factory=dict)   # A reads the units
    copy_out: dict[fx.Node, int] = field(default_factory=dict)   # B writes the units


def _shape(node: fx.Node) -> tuple[int, ...]:
    meta = node.meta.get("tensor_meta")
    if meta is None or not hasattr(meta, "shape"):
        raise SiteError(f"node {node.name} has no shape: run torch.fx.passes.shape_prop.ShapeProp"
                        " on the graph module before widen_layer")
    return tuple(meta.shape)


def _arg(node: fx.Node, index: int, name: str, default):
    return node.args[index] if len(node.args) > index else node.kwargs.get(name, default)


def _only_input(node: fx.Node, source: fx.Node, unit: int) -> bool:
    """Does ``node`` read ``source`` as its first argument and no other tensor (sizes of
    ``source``'s leading dims aside, as in ``x.view(x.size(0), -1)``)?"""
    inputs = [n for n in node.all_input_nodes if not _leading_size(n, source, unit)]
    return bool(node.args) and node.args[0] is source and inputs == [source]


def _leading_size(node: fx.Node, source: fx.Node, unit: int) -> bool:
    """``source.size(d)`` or ``source.shape[d]`` with ``d`` before the unit dim: a size that
    widening leaves as it is."""
    if node.op == "call_method" and node.target == "size" and len(node.args) == 2:
        return node.args[0] is source and isinstance(node.args[1], int) and \
            0 <= node.args[1] < unit
    if node.op == "call_function" and node.target is operator.getitem:
        shape = node.args[0]
        return isinstance(shape, fx.Node) and shape.op == "call_function" and \
            shape.target is getattr and shape.args == (source, "shape") and \
            isinstance(node.args[1], int) and 0 <= node.args[1] < unit
    return False


def _reads_leading_size(user: fx.Node, source: fx.Node, unit: int) -> bool:
    """A user of ``source`` that only reads leading sizes (``x.size(0)``, ``x.shape``
    indexed before the unit dim)."""
    if _leading_size(user, source, unit):
        return True
    return user.op == "call_function" and user.target is getattr and \
        user.args == (source, "shape") and bool(user.users) and \
        all(_leading_size(u, source, unit) for u in user.users)


def _step(gm: fx.GraphModule, node: fx.Node, unit: int, ndim: int) -> tuple[str, int, int] | None:
    """How ``node`` moves the unit dimension: ``(kind, new unit dim, block factor)``; None when
    it mixes units (then widening through it would change the function)."""
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        if isinstance(module, ELEMENTWISE_MODULES):
            return "pointwise", unit, 1
        if isinstance(module, nn.PReLU):    # a shared slope, or one per unit on dim 1
            return ("pointwise", unit, 1) if module.num_parameters == 1 else \
                ("norm", unit, 1) if unit == 1 else None
        if isinstance(module, CHANNEL_MODULES + NORMS) and unit == 1:
            return ("norm" if isinstance(module, NORMS) else "pointwise"), unit, 1
        if isinstance(module, nn.Flatten):
            return _flatten(node, unit, ndim, module.start_dim, module.end_dim)
        return None
    if node.op == "call_function" and node.target in ELEMENTWISE_FUNCTIONS:
        return "pointwise", unit, 1
    if node.op == "call_function" and node.target in CHANNEL_FUNCTIONS:
        return ("pointwise", unit, 1) if unit == 1 else None
    if node.op == "call_method" and node.target in ELEMENTWISE_METHODS:
        return "pointwise", unit, 1
    is_mean = (node.op, node.target) in {("call_method", "mean"), ("call_function", torch.mean)}
    if is_mean:
        return _mean(node, unit, ndim)
    if (node.op, node.target) in {("call_method", "view"), ("call_method", "reshape"),
                                  ("call_function", torch.reshape)}:
        return _view_flatten(node, unit, ndim)
    is_flatten = (node.op, node.target) in {("call_method", "flatten"),
                                           ("call_function", torch.flatten)}
    if is_flatten:
        return _flatten(node, unit, ndim, _arg(node, 1, "start_dim", 0),
                        _arg(node, 2, "end_dim", -1))
    return None


def _mean(node: fx.Node, unit: int, ndim: int) -> tuple[str, int, int] | None:
    dims = _arg(node, 1, "dim", None)
    if dims is None:
        return None
    dims = {d % ndim for d in ([dims] if isinstance(dims, int) else dims)}
    if unit in dims:
        return None
    keep = _arg(node, 2, "keepdim", False)
    return "pointwise", unit if keep else unit - sum(d < unit for d in dims), 1


def _view_flatten(node: fx.Node, unit: int, ndim: int) -> tuple[str, int, int] | None:
    """``x.view(x.size(0), -1)`` (or ``reshape``) that flattens the unit dim and everything
    after it, with ``-1`` last so it still fits once the units are more."""
    sizes = list(node.args[1:])
    if len(sizes) == 1 and isinstance(sizes[0], list | tuple):
        sizes = list(sizes[0])
    before, after = _shape(node.args[0]), _shape(node)
    if node.kwargs or len(sizes) != unit + 1 or sizes[-1] != -1 or \
            after != before[:unit] + (math.prod(before[unit:]),):
        return None
    return "flatten", unit, math.prod(before[unit + 1:])


def _flatten(node, unit: int, ndim: int, start: int, end: int) -> tuple[str, int, int] | None:
    start, end = start % ndim, end % ndim
    if start > unit:                # flattening only dims after the unit dim: unit stays
        return "pointwise", unit, 1
    if start == unit and end == ndim - 1:
        return "flatten", unit, math.prod(_shape(node.args[0])[unit + 1:])
    return None


def _is_branch(gm: fx.GraphModule, node) -> bool:
    """``node`` may be any argument (a constant, the output's tuple or dict), not only a node."""
    return isinstance(node, fx.Node) and node.op == "call_module" and \
        isinstance(gm.get_submodule(node.target), BypassBranch)


def _is_add_of(node: fx.Node, a: fx.Node, b: fx.Node) -> bool:
    return node.op == "call_function" and node.target is operator.add and \
        len(node.args) == 2 and set(node.args) == {a, b} and not node.kwargs


def _branch_pattern(gm: fx.GraphModule, node: fx.Node, first: fx.Node):
    """Bypass branches around the widened tensor ``node``, as ``(case, next node, branch)``:

    - ``residual``: ``node + blk(node)`` (a Deepen block) — blk reads and writes units;
    - ``grown_out``: ``site1(x) + br(x)`` (a grown branch at site1) — br writes units;
    - ``grown_in``: ``site2(node) + br(node)`` (a grown branch at site2) — br reads units.
    """
    users = list(node.users)
    if len(users) == 1 and node is first:
        add = users[0]
        other = [a for a in add.args if a is not node]
        if len(other) == 1 and _is_branch(gm, other[0]) and _is_add_of(add, node, other[0]) \
                and other[0].args[0] is first.args[0]:
            return "grown_out", add, other[0]
    if len(users) != 2:
        return None
    for blk, other in (users, users[::-1]):
        if not (_is_branch(gm, blk) and blk.args[0] is node and len(blk.users) == 1):
            continue
        (add,) = blk.users
        if _is_add_of(add, node, blk) and other is add:
            return "residual", add, blk
        if _is_add_of(add, other, blk) and other.op == "call_module" and \
                isinstance(gm.get_submodule(other.target), SITES) and other.args[0] is node:
            return "grown_in", other, blk
    return None


def _trace_chain(gm: fx.GraphModule, first: fx.Node) -> _Chain:
    """Follow site1's output to the next site through per-unit ops and bypass branches, or
    explain why not."""
    module = gm.get_submodule(first.target)
    unit = 1 if isinstance(module, nn.modules.conv._ConvNd) else len(_shape(first)) - 1
    chain = _Chain(first, first, [], {}, 1, unit, len(_shape(first)))
    node = first
    while True:
        chain.ndim = len(_shape(node))
        pattern = _branch_pattern(gm, node, first)
        if pattern is not None:
            case, user, branch = pattern
            if case == "residual":
                _check_residual(gm, branch, chain)
            if case != "grown_out":
                chain.split_in[branch] = chain.block
            if case != "grown_in":
                chain.copy_out[branch] = chain.block
            if case == "grown_in":
                chain.second = user
                return chain
            node = user
            continue
        user = _single_user(node, first, chain.unit)
        if user.op == "call_module" and isinstance(gm.get_submodule(user.target), SITES):
            chain.second = user
            return chain
        step = _step(gm, user, chain.unit, chain.ndim)
        if step is None:
            raise SiteError(f"{user.format_node()} mixes units, so widening {first.target} "
                            "through it cannot preserve the function; supported between two "
                            "sites: activations, dropout, BatchNorm, pooling, a spatial mean, "
                            "flatten of the trailing dims, residual blocks and grown branches")
        kind, chain.unit, factor = step
        chain.block *= factor
        if kind == "norm":
            chain.norms.append(user)
            chain.norm_blocks[user] = chain.block     # features per unit there (after a flatten)
        node = user


def _check_residual(gm: fx.GraphModule, branch: fx.Node, chain: _Chain) -> None:
    module = gm.get_submodule(branch.target)
    fits = (module.kind == "linear" and chain.unit == chain.ndim - 1) or \
        (module.kind == "conv" and chain.unit == 1 and chain.block == 1 and module.conv.groups == 1)
    if not fits:
        raise SiteError(f"residual block {branch.target} ({module.kind}) does not read the "
                        "widened units on its feature/channel axis; widen another layer")


def _single_user(node: fx.Node, first: fx.Node, unit: int) -> fx.Node:
    users = [u for u in node.users if not _reads_leading_size(u, node, unit)]
    if len(users) != 1:
        raise SiteError(
            f"the output of {node.name} is used by {len(users)} nodes "
            f"({', '.join(u.name for u in users) or 'none'}), e.g. a residual add: widening "
            f"{first.target} would change its shape there; widen another layer "
            "(see widenable_pairs(gm))")
    if not _only_input(users[0], node, unit):
        raise SiteError(f"{users[0].format_node()} combines the widened tensor with another "
                        "one (e.g. a residual add): its shapes would no longer match; widen "
                        "another layer (see widenable_pairs(gm))")
    return users[0]


def _check_ends(gm: fx.GraphModule, chain: _Chain) -> None:
    """Both ends ungrouped; the units reach site2 as its channels (conv) or features (linear)."""
    first, second = (gm.get_submodule(n.target) for n in (chain.first, chain.second))
    for name, module in ((chain.first.target, first), (chain.second.target, second)):
        if getattr(module, "groups", 1) != 1:
            raise SiteError(f"{name} is a grouped conv (groups={module.groups}); widening "
                            "grouped/depthwise convs is not supported: widen another layer")
    _check_untied(gm, [chain.first.target, *(n.target for n in chain.norms),
                       chain.second.target])
    if isinstance(second, nn.modules.conv._ConvNd) and (chain.block != 1 or chain.unit != 1):
        raise SiteError(f"{chain.second.target} is a conv but the widened units do not reach it "
                        "as channels")
    if isinstance(second, nn.Linear) and chain.unit != chain.ndim - 1:
        raise SiteError(f"the widened units do not reach {chain.second.target} on its last "
                        "(feature) dimension")


def _check_untied(gm: fx.GraphModule, targets: list[str]) -> None:
    """Widening replaces these modules by resized copies: a parameter they share with another
    module would be silently untied (and the other module cannot be resized alike)."""
    owners: dict[int, list[str]] = {}
    for name, param in gm.named_parameters(remove_duplicate=False):
        owners.setdefault(id(param), []).append(name)
    for target in targets:
        for name, param in gm.get_submodule(target).named_parameters(prefix=target):
            others = [owner for owner in owners[id(param)] if owner != name]
            if others:
                raise SiteError(f"{name} is tied to {', '.join(others)} (a shared weight); "
                                "widening would untie it: widen another layer")


def _site_node(gm: fx.GraphModule, target: str) -> fx.Node:
    nodes = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == target]
    module = gm.get_submodule(target) if nodes else None
    if len(nodes) != 1 or not isinstance(module, SITES):
        found = f"{len(nodes)} calls" if nodes else "no call"
        raise SiteError(f"widen needs {target!r} to be an nn.Linear/ConvNd called once; found "
                        f"{found}. Widenable pairs: {widenable_pairs(gm)}")
    return nodes[0]


def _replace(gm: fx.GraphModule, target: str, module: nn.Module) -> None:
    parent, _, name = target.rpartition(".")
    setattr(gm.get_submodule(parent) if parent else gm, name, module)


def widen_layer(gm: fx.GraphModule, first: str, new_width: int, *, second: str | None = None,
                noise: float = 0.0,
                generator: torch.Generator | None = None) -> PassResult[WidenInfo]:
    """Widen the output units of module ``first`` (and its consumer ``second``) to ``new_width``.

    ``first``/``second`` are module paths (site names); ``second`` is found by following the graph
    and, when given, checked. Raises ``SiteError`` naming the widenable pairs when the location is
    not one (last layer, output shared by a residual add, unit-mixing op in between, ...).
    """
    chain = _trace_chain(gm, _site_node(gm, first))
    if second is not None and chain.second.target != second:
        raise SiteError(f"{first} feeds {chain.second.target}, not {second}")
    site1 = gm.get_submodule(first)
    old = site1.weight.shape[0]
    _check_ends(gm, chain)
    if new_width <= old:
        raise SiteError(f"{first} has {old} units; new_width must be larger, got {new_width}")
    mapping = unit_map(old, new_width, generator)
    index = torch.tensor(mapping, device=site1.weight.device)
    split = split_weights(mapping, noise, generator).to(site1.weight.device)
    _replace(gm, first, widen_out(site1, index, new_width))
    for norm in chain.norms:
        _replace(gm, norm.target, widen_out(gm.get_submodule(norm.target), index, new_width,
                                            chain.norm_blocks[norm]))
    _replace(gm, chain.second.target,
             widen_in(gm.get_submodule(chain.second.target), index, split, chain.block))
    for node in {**chain.split_in, **chain.copy_out}:
        widen_branch(gm.get_submodule(node.target), index, split, chain.split_in.get(node),
                      chain.copy_out.get(node))
    info = WidenInfo(first, chain.second.target, [n.target for n in chain.norms], old, new_width,
                     mapping, split.tolist())
    return PassResult(gm, modified=True, analysis=info)


def widenable_pairs(gm: fx.GraphModule) -> list[tuple[str, str]]:
    """Every ``(first, second)`` pair of module paths that :func:`widen_layer` accepts."""
    pairs = []
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(gm.get_submodule(node.target), SITES):
            continue
        if sum(n.op == "call_module" and n.target == node.target for n in gm.graph.nodes) != 1:
            continue
        try:
            chain = _trace_chain(gm, node)
            _check_ends(gm, chain)
        except SiteError:
            continue
        pairs.append((node.target, chain.second.target))
    return pairs
