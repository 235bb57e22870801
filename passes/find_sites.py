"""Analysis pass: find the extension sites of a graph and annotate their nodes.

Rules as data: each supported operator maps to how its weight, bias, input and hyper-parameters
are read. Export graphs (aten ops) and symbolic_trace graphs (``call_module`` / ``F.*``) share one
table, so the site table speaks in module paths and parameter names whichever frontend ran.

What every node reads is recorded by :mod:`morphc.ir.site_uses`; this pass decides from those
records: a weight read only by site operators of one shape is a site (a row slice of one packed
parameter is a site per slice, weight norm folds into ``v`` and ``g``), and every linear-operator
weight that cannot be a site is listed in ``SiteTable.exclusions`` with the reason (also used
elsewhere, fused RNN ops, bilinear maps, weights computed by other code such as spectral_norm,
weights used inside higher-order-op subgraphs).
"""

from __future__ import annotations

import operator

import torch
from morphc.passes.infra import PassResult
from torch import fx

from morphc.ir.site_rules import (
    _BROADCASTS,
    _SPLITS,
    _WEIGHT_NORM,
    BATCHED_TARGETS,
    EINSUM_TARGETS,
    FUNCTION_RULES,
    MATMUL_TARGETS,
    _arg,
    _param_node,
    _shape,
    is_transpose,
)
from morphc.ir.site_uses import (
    Use,
    Uses,
    einsum_operands,
    flatten,
    record_function_call,
    record_module_call,
)
from morphc.ir.sites import Site, SiteTable, SiteUse, input_of
from morphc.ir.tags import Role, tag
from morphc.ir.weight_views import is_view

aten = torch.ops.aten


def _site_name(use: Use, taken: set[str]) -> str:
    ref = use.weight
    name = use.module_name or ref.name.removesuffix(".weight")
    if ref.weight_norm is not None:
        name = ref.name.removesuffix(".parametrizations.weight.original1")
    if ref.rows is not None:
        name = f"{ref.name}.rows{ref.rows[0]}_{ref.rows[1]}"
    return name if name not in taken else f"{ref.name}.{use.node.name}"


def _build_site(key, uses: Uses, taken: set[str]) -> Site:
    entries = uses.site[key]
    first = entries[0]
    ref = first.weight
    site = Site(name=_site_name(first, taken), kind=first.kind, weight_name=ref.name,
                in_features=int(first.in_f), out_features=int(first.out_f), conv=first.conv,
                rows=ref.rows,
                weight_norm=(ref.weight_norm[0], ref.weight_norm[2]) if ref.weight_norm else None)
    for use in entries:
        site.uses.append(SiteUse(
            node=use.node.name, op=use.label, input_arg=use.input_arg,
            bias_name=use.bias.name if use.bias else None,
            input_shape=_shape(input_of(use.node, use.input_arg)), output_shape=_shape(use.node),
            bias_rows=use.bias.rows if use.bias else None))
        if use.kind != first.kind or use.conv != site.conv or \
                bool(use.weight.weight_norm) != bool(ref.weight_norm):
            site.excluded = (f"weight {site.weight_name} is used by different operators "
                             f"({first.kind} at {first.node.name}, {use.kind} at "
                             f"{use.node.name}), as when a decoder reuses an encoder's W as "
                             "Wᵀ: one folded update would change both; give each its own "
                             "weight (untie them) to extend it")
        if use.bias is None or uses.other.get(id(use.bias.tensor)):
            site.bias_foldable = False
    tensor_key = id(ref.tensor)
    if uses.other.get(tensor_key):
        site.excluded = (f"weight {site.weight_name} is also used outside linear sites "
                         f"(by {', '.join(uses.other[tensor_key])}); folding into it would "
                         "change them")
    if ref.weight_norm and uses.other.get(id(ref.weight_norm[1])):
        site.excluded = f"weight-norm gain {ref.weight_norm[0]} is also used outside the site"
    if tensor_key in uses.bias:
        site.excluded = f"weight {site.weight_name} is also used as a bias"
    if ref.tensor.numel() == 0:
        site.excluded = (f"weight {site.weight_name} has no elements (shape "
                         f"{tuple(ref.tensor.shape)}): a zero-size layer has nothing to extend")
    if not ref.tensor.is_floating_point():
        site.excluded = (f"weight {site.weight_name} is {ref.tensor.dtype}: activation "
                         "families and their constraint sets are real-valued")
    clash = _overlapping_rows(ref, uses) if ref.weight_norm is None else None
    if clash is not None:
        site.excluded = (f"weight {site.weight_name} is read by overlapping row ranges "
                         f"({_rows_text(ref.rows)} and {clash}): each range's "
                         "branch would fold its own update into the shared rows; read disjoint "
                         "row slices (or the same one) to extend them")
    return site


def _overlapping_rows(ref, uses: Uses) -> str | None:
    """Rows of the same parameter another site reads that overlap ``ref``'s without being them
    (a whole use overlaps every slice): two folds would both write the shared rows."""
    size0 = ref.tensor.shape[0]
    mine = ref.rows or (0, size0)
    for tensor_key, rows in uses.site:
        theirs = rows or (0, size0)
        if tensor_key == id(ref.tensor) and theirs != mine and \
                theirs[0] < mine[1] and mine[0] < theirs[1]:
            return _rows_text(rows)
    return None


def _rows_text(rows: tuple[int, int] | None) -> str:
    return "whole" if rows is None else f"rows {rows[0]}:{rows[1]}"


def _check_other_uses(gm, uses: Uses) -> None:
    """Any use of a parameter that is not a recorded site operand blocks folding into it."""
    for node in gm.graph.nodes:
        param = _param_node(gm, node) if node.op == "get_attr" else None
        if param is None:
            continue
        key = uses.note(*param)
        stack = [node]
        while stack:
            current = stack.pop()
            for user in current.users:
                if _reads_metadata(user):
                    continue
                if user not in uses.operands.get(current, ()) or \
                        sum(a is current for a in flatten([*user.args,
                                                           *user.kwargs.values()])) != 1:
                    uses.other[key].append(user.name)
                elif user.target in _SPLITS or user.target is operator.getitem or \
                        is_transpose(user) or user.target is aten.slice.Tensor or \
                        user.target in _WEIGHT_NORM or user.target in _BROADCASTS or \
                        is_view(user.target) or \
                        user.op == "call_module" and \
                        type(gm.get_submodule(user.target)).__name__ == "_WeightNorm":
                    stack.append(user)


def _reads_metadata(user: fx.Node) -> bool:
    """``w.shape`` / ``w.size()`` / ``w.dtype`` read no values: not a use that blocks a fold."""
    if user.op == "call_function" and user.target is getattr:
        return user.args[1] in ("shape", "dtype", "device", "ndim", "requires_grad")
    if user.op == "call_method":
        return user.target in ("size", "dim")
    return user.op == "call_function" and user.target in (aten.sym_size.int, torch.Tensor.size)


def _linear_weight_operands(node: fx.Node) -> list:
    """Weight operands of a linear-family op (for exclusions when it is not a site)."""
    rule = FUNCTION_RULES.get(node.target)
    if rule is not None:
        return [_arg(node, *rule.weight)]
    if node.target in MATMUL_TARGETS:
        return list(node.args[:2])
    if node.target in EINSUM_TARGETS:
        return einsum_operands(node)
    if node.target in BATCHED_TARGETS:
        _, _, (left, left_name), (right, right_name) = BATCHED_TARGETS[node.target]
        return [_arg(node, left, left_name), _arg(node, right, right_name)]
    return []


def _computed_weights(gm, uses: Uses, sites: SiteTable) -> None:
    """A linear-family op whose weight is computed from parameters by other code (spectral_norm,
    scaling, a parametrization without a fold rule): list those parameters as excluded."""
    site_nodes = {u.node for s in sites.values() for u in s.uses}
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.name in site_nodes:
            continue
        for operand in _linear_weight_operands(node):
            if not isinstance(operand, fx.Node) or _param_node(gm, operand):
                continue
            found = _ancestor_params(gm, operand)
            if found is None:
                continue
            params, ops = found
            for name in params:
                if name not in sites.covered():
                    uses.exclusions.setdefault(name, (
                        f"the weight of {node.name} is computed from it by other code "
                        f"({', '.join(sorted(ops)[:4])}); folding needs a parameter the "
                        "folded W' can be written into, and no value of it is known to give an "
                        "arbitrary W' through that code (spectral_norm's division by a norm "
                        "estimate, a scale); pass the parameter itself (or .t(), .T, a row "
                        "slice, weight_norm) to the linear operator to make it a site"))


def _ancestor_params(gm, node: fx.Node, limit: int = 40) -> tuple[list[str], set[str]] | None:
    """The parameters a weight operand is computed from, or None when it depends on the
    inputs (an activation, e.g. attention's ``q @ kᵀ``)."""
    params, ops, seen, stack = [], set(), set(), [node]
    while stack:
        if len(seen) > limit:
            return None
        current = stack.pop()
        if current in seen:
            continue
        seen.add(current)
        param = _param_node(gm, current)
        if param is not None:
            params.append(param[0])
            continue
        if current.op == "placeholder":
            return None
        if current.op == "get_attr":
            continue
        ops.add(str(getattr(current.target, "__name__", current.target)))
        stack.extend(a for a in flatten([*current.args, *current.kwargs.values()])
                     if isinstance(a, fx.Node))
    return params, ops


def _higher_order_uses(gm, uses: Uses) -> None:
    """Parameters passed into a higher-order op (``wrap_with_set_grad_enabled`` …) and used
    there as a linear-operator weight: sites inside HOP subgraphs are not supported."""
    for node in gm.graph.nodes:
        if node.op != "call_function" or not isinstance(node.target,
                                                        torch._ops.HigherOrderOperator):
            continue
        bodies = [a for a in node.args if isinstance(a, fx.Node) and a.op == "get_attr"
                  and isinstance(getattr(gm, str(a.target), None), fx.GraphModule)]
        for body_node in bodies:
            body = getattr(gm, str(body_node.target))
            operands = node.args[node.args.index(body_node) + 1:]
            holders = [n for n in body.graph.nodes if n.op == "placeholder"]
            for holder, operand in zip(holders, operands, strict=False):
                param = _param_node(gm, operand)
                if param is None:
                    continue
                if any(holder in _linear_weight_operands(u) for u in holder.users):
                    uses.exclusions.setdefault(param[0], (
                        f"used as a linear weight inside the higher-order op {node.name} "
                        f"({node.target}); sites inside such subgraphs are not supported"))


def find_sites(gm: fx.GraphModule) -> PassResult[SiteTable]:
    """Find every extension site and tag its nodes ``Role.SITE`` (an analysis: the graph is not
    rewritten). ``analysis``: the :class:`~morphc.ir.sites.SiteTable`.
    """
    uses = Uses()
    for node in gm.graph.nodes:
        if node.op == "call_module":
            if type(gm.get_submodule(node.target)).__name__ != "_WeightNorm":
                record_module_call(gm, node, uses)
        elif node.op == "call_function":
            record_function_call(gm, node, uses)
    _check_other_uses(gm, uses)
    _higher_order_uses(gm, uses)
    table = SiteTable()
    for key in uses.site:
        site = _build_site(key, uses, set(table))
        table[site.name] = site
        for node in gm.graph.nodes:
            if node.name in site.node_names:
                tag(node, Role.SITE, site.name)
    _computed_weights(gm, uses, table)
    covered = table.covered()
    table.exclusions.update({k: v for k, v in uses.exclusions.items() if k not in covered})
    return PassResult(gm, modified=False, analysis=table)
