"""Analysis pass: find the extension sites of a graph and annotate their nodes.

Rules as data: each supported operator maps to how its weight, bias, input and hyper-parameters
are read. Export graphs (aten ops) and symbolic_trace graphs (``call_module`` / ``F.*``) share one
table, so the site table speaks in module paths and parameter names whichever frontend ran.

A weight operand is resolved through the ways models build it from a parameter
(:func:`_resolve`): a row slice of one packed parameter (``split`` / ``chunk`` / ``slice`` +
``getitem``: ``nn.MultiheadAttention``'s cross-attention ``in_proj_weight``) is a site per slice,
folded into its rows; ``_weight_norm(v, g, dim)`` is a site folded into ``v`` and ``g``. An
``einsum`` that is a linear map of one input by a 2-D parameter, and ``bmm`` / ``baddbmm`` against
a 2-D parameter broadcast over the batch, are sites of the existing kinds (linear, matmul_right,
matmul_left), so branch and fold are theirs; a 3-D batch of weights is G maps, not a site. Every
linear-operator weight that cannot be a site is listed in ``SiteTable.exclusions`` with the
reason (fused RNN ops, bilinear maps, weights computed by other code such as spectral_norm,
weights used inside higher-order-op subgraphs).
"""

from __future__ import annotations

import operator
from collections import defaultdict
from dataclasses import dataclass, field

import torch
from morphc.passes.infra import PassResult
from torch import fx, nn

from morphc.ir.einsum_map import einsum_map
from morphc.ir.site_rules import (
    _BATCHED_3D,
    _BATCHED_OTHER,
    _BROADCASTS,
    _SPLITS,
    _TRANSPOSES,
    _WEIGHT_NORM,
    BATCHED_TARGETS,
    EINSUM_TARGETS,
    EXCLUDED_MODULES,
    EXCLUDED_TARGETS,
    FUNCTION_RULES,
    MATMUL_TARGETS,
    SITE_MODULES,
    _arg,
    _conv_from_module,
    _conv_from_node,
    _features,
    _FunctionRule,
    _param_node,
    _Ref,
    _resolve,
    _shape,
    resolve_broadcast,
)
from morphc.ir.sites import ConvConfig, Site, SiteTable, SiteUse, input_of
from morphc.ir.tags import Role, tag

aten = torch.ops.aten


@dataclass
class _Use:
    node: fx.Node
    kind: str
    label: str
    weight: _Ref
    bias: _Ref | None
    input_arg: int
    in_f: int
    out_f: int
    conv: ConvConfig | None = None
    module_name: str | None = None


@dataclass
class _Uses:
    """Every use of every parameter, so a weight also used elsewhere is never folded into."""

    site: dict[tuple, list[_Use]] = field(default_factory=lambda: defaultdict(list))
    bias: dict[int, list[fx.Node]] = field(default_factory=lambda: defaultdict(list))
    other: dict[int, list[str]] = field(default_factory=lambda: defaultdict(list))
    names: dict[int, str] = field(default_factory=dict)
    operands: dict[fx.Node, set[fx.Node]] = field(default_factory=lambda: defaultdict(set))
    exclusions: dict[str, str] = field(default_factory=dict)

    def note(self, name: str, tensor: torch.Tensor) -> int:
        self.names.setdefault(id(tensor), name)
        return id(tensor)

    def consume(self, user: fx.Node, ref: _Ref | None) -> None:
        """``user`` reads ``ref`` as its weight/bias: each node of the chain is one such use."""
        if ref is None:
            return
        for node, reader in ref.edges:
            self.operands[node].add(reader if reader is not None else user)


def _record_module_call(gm, node, uses: _Uses) -> None:
    module = gm.get_submodule(node.target)
    for cls, reason in EXCLUDED_MODULES:
        if isinstance(module, cls):
            for pname, tensor in module.named_parameters(prefix=node.target):
                uses.note(pname, tensor)
                uses.exclusions.setdefault(pname, reason)
                uses.other[id(tensor)].append(node.name)
            return
    site_weight = module.weight if isinstance(module, SITE_MODULES) else None
    if site_weight is not None and isinstance(module, nn.modules.conv._ConvTransposeNd) and \
            (len(node.args) > 1 or node.kwargs):
        uses.exclusions[f"{node.target}.weight"] = (
            "ConvTranspose called with output_size: the output grid is chosen at call time")
        site_weight = None
    bias = getattr(module, "bias", None) if site_weight is not None else None
    for pname, tensor in module.named_parameters(prefix=node.target):
        key = uses.note(pname, tensor)
        if tensor is site_weight:
            bias_ref = None
            if bias is not None:
                uses.note(f"{node.target}.bias", bias)
                bias_ref = _Ref(f"{node.target}.bias", bias, [])
                uses.bias[id(bias)].append(node)
            conv = _conv_from_module(module) if isinstance(module, nn.modules.conv._ConvNd) \
                else None
            kind = "linear" if conv is None else "conv_transpose" if conv.transposed else "conv"
            in_f, out_f = _features(kind, tuple(tensor.shape), conv)
            uses.site[(key, None)].append(_Use(
                node, kind, f"nn.{type(module).__name__}", _Ref(pname, tensor, []), bias_ref, 0,
                in_f, out_f, conv, node.target))
        elif tensor is not bias:
            uses.other[key].append(node.name)


def _record_rule(gm, node, rule: _FunctionRule, uses: _Uses) -> None:
    weight = _resolve(gm, _arg(node, *rule.weight))
    if weight is None:
        return
    if rule.layout == "addmm" and (node.kwargs.get("beta", 1) != 1 or
                                   node.kwargs.get("alpha", 1) != 1):
        return
    bias = _resolve(gm, _arg(node, *rule.bias)) if rule.bias else None
    if bias is not None and bias.weight_norm is not None:
        bias = None
    shape = weight.shape
    conv = _conv_from_node(node, rule, weight.tensor) if rule.kind in ("conv", "conv_transpose") \
        else None
    kind = rule.kind
    if conv is not None and conv.transposed:
        kind = "conv_transpose"
    if weight.transposed:        # x @ t(W) with W (out, in) is a linear map; mm(t(W)) in addmm
        kind = {"matmul_right": "linear"}.get(kind)
        shape = tuple(weight.tensor.shape)
        if kind is None:
            return
    if weight.rows is not None and (kind != "linear" or conv is not None):
        return
    in_f, out_f = _features(kind, shape, conv)
    uses.consume(node, weight)
    uses.consume(node, bias)
    uses.note(weight.name, weight.tensor)
    if weight.weight_norm:
        uses.note(weight.weight_norm[0], weight.weight_norm[1])
    if bias is not None:
        uses.note(bias.name, bias.tensor)
        uses.bias[id(bias.tensor)].append(node)
    uses.site[weight.key].append(_Use(node, kind, rule.label, weight, bias, rule.input,
                                      in_f, out_f, conv))


def _einsum_operands(node: fx.Node) -> list:
    """``einsum(eq, [a, b])`` (export) or ``einsum(eq, a, b)`` (symbolic_trace)."""
    return list(node.args[1]) if isinstance(node.args[1], list | tuple) else list(node.args[1:])


def _add_site(uses: _Uses, node, kind, label, ref: _Ref, bias: _Ref | None, input_arg) -> None:
    """Record ``node`` as a use of the 2-D weight ``ref`` by a site of ``kind``."""
    in_f, out_f = _features(kind, tuple(ref.tensor.shape), None)
    uses.consume(node, ref)
    uses.consume(node, bias)
    uses.note(ref.name, ref.tensor)
    if bias is not None:
        uses.note(bias.name, bias.tensor)
        uses.bias[id(bias.tensor)].append(node)
    uses.site[ref.key].append(_Use(node, kind, label, ref, bias, input_arg, in_f, out_f))


def _record_einsum(gm, node, uses: _Uses) -> None:
    """An einsum against a 2-D parameter that is a linear map of the other operand is a site of
    the kind it maps onto (:mod:`morphc.ir.einsum_map`); any other is an explained exclusion."""
    operands = _einsum_operands(node)
    refs = [_resolve(gm, o) for o in operands]
    for index, ref in enumerate(refs):
        if ref is None or ref.tensor.dim() < 2:
            continue
        why = f"einsum {node.args[0]!r} against the {ref.tensor.dim()}-D parameter"
        if ref.tensor.dim() != 2 or ref.weight_norm is not None or len(refs) != 2 or \
                refs[1 - index] is not None:
            uses.exclusions.setdefault(ref.name, f"{why}: not a linear map of one input by one "
                                       "2-D weight")
            continue
        found = einsum_map(str(node.args[0]), index, ref.transposed)
        if isinstance(found, str) or (ref.rows is not None and found.kind != "linear"):
            reason = found if isinstance(found, str) else "a row slice folds only as (out, in)"
            uses.exclusions.setdefault(ref.name, (
                f"{why}: {reason}; write it as F.linear(x, W) or x @ W on the last axis to "
                "extend it"))
            continue
        kind = found.kind
        _add_site(uses, node, kind, EINSUM_TARGETS[node.target], ref, None,
                  1 + found.input_operand)


def _record_batched(gm, node, uses: _Uses) -> None:
    """``bmm`` / ``baddbmm`` against one 2-D parameter broadcast over the batch is the
    ``matmul_right`` (``x P``, bias folded like addmm's) or ``matmul_left`` (``W x``) kind; a 3-D
    parameter is G separate maps, an explained exclusion."""
    label, bias_at, (left, left_name), (right, right_name) = BATCHED_TARGETS[node.target]
    unit = node.kwargs.get("beta", 1) == 1 and node.kwargs.get("alpha", 1) == 1
    sides = (((right, right_name), left, "matmul_right"), ((left, left_name), right, "matmul_left"))
    for (param_at, param_name), input_at, kind in sides:
        operand = _arg(node, param_at, param_name)
        ref, how = resolve_broadcast(gm, operand)
        if ref is None or not unit:
            root = _broadcast_source(gm, operand)
            if root is not None:
                name, tensor = root
                text = _BATCHED_3D if tensor.dim() == 3 and how == "directly" else _BATCHED_OTHER
                uses.exclusions.setdefault(name, text.format(
                    op=label, name=name, shape=tuple(tensor.shape),
                    how=how if unit else f"{how or 'an operand'} with beta/alpha != 1"))
            continue
        bias = _resolve(gm, _arg(node, bias_at, "input")) if bias_at is not None and \
            kind == "matmul_right" else None
        if bias is not None and (bias.rows is not None or bias.weight_norm is not None or
                                 bias.transposed or
                                 tuple(bias.tensor.shape) != (ref.tensor.shape[1],)):
            bias = None          # a (G, 1, out) or other-shaped bias: the branch gets no offset
        _add_site(uses, node, kind, label, ref, bias, input_at)
        return


def _broadcast_source(gm, operand):
    """The parameter at the root of a broadcast chain, if any (for exclusions)."""
    while isinstance(operand, fx.Node) and operand.op in ("call_function", "call_method") and \
            operand.target in _BROADCASTS:
        operand = operand.args[0]
    return _param_node(gm, operand)


def _record_function_call(gm, node, uses: _Uses) -> None:
    rule = FUNCTION_RULES.get(node.target)
    if rule is not None:
        _record_rule(gm, node, rule, uses)
        return
    if node.target in EXCLUDED_TARGETS:
        for leaf in _flatten([*node.args, *node.kwargs.values()]):
            ref = _resolve(gm, leaf)
            if ref is not None:
                uses.exclusions.setdefault(ref.name, EXCLUDED_TARGETS[node.target])
        return
    if node.target in EINSUM_TARGETS:
        _record_einsum(gm, node, uses)
        return
    if node.target in BATCHED_TARGETS:
        _record_batched(gm, node, uses)
        return
    if node.target in MATMUL_TARGETS and len(node.args) == 2:
        for side, (param_arg, input_arg) in (("matmul_right", (1, 0)), ("matmul_left", (0, 1))):
            ref = _resolve(gm, node.args[param_arg])
            if ref is None or ref.tensor.dim() != 2 or ref.rows or ref.weight_norm:
                continue
            kind = side
            if ref.transposed:
                if side == "matmul_left":
                    continue
                kind = "linear"         # x @ Wᵀ
            in_f, out_f = _features(kind, tuple(ref.tensor.shape), None) \
                if kind != "matmul_left" else (ref.tensor.shape[1], ref.tensor.shape[0])
            uses.consume(node, ref)
            uses.note(ref.name, ref.tensor)
            uses.site[ref.key].append(_Use(node, kind, MATMUL_TARGETS[node.target], ref, None,
                                           input_arg, in_f, out_f))
            return


def _flatten(value):
    if isinstance(value, list | tuple):
        for v in value:
            yield from _flatten(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _flatten(v)
    else:
        yield value


def _site_name(use: _Use, taken: set[str]) -> str:
    ref = use.weight
    name = use.module_name or ref.name.removesuffix(".weight")
    if ref.weight_norm is not None:
        name = ref.name.removesuffix(".parametrizations.weight.original1")
    if ref.rows is not None:
        name = f"{ref.name}.rows{ref.rows[0]}_{ref.rows[1]}"
    return name if name not in taken else f"{ref.name}.{use.node.name}"


def _build_site(key, uses: _Uses, taken: set[str]) -> Site:
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
                             f"{use.node.name})")
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
    if ref.rows is not None and ref.weight_norm is None and \
            any(k[0] == tensor_key and k[1] is None for k in uses.site):
        site.excluded = f"weight {site.weight_name} is used both whole and by row slices"
    return site


def _check_other_uses(gm, uses: _Uses) -> None:
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
                        sum(a is current for a in _flatten([*user.args,
                                                           *user.kwargs.values()])) != 1:
                    uses.other[key].append(user.name)
                elif user.target in _SPLITS or user.target is operator.getitem or \
                        user.target in _TRANSPOSES or user.target is aten.slice.Tensor or \
                        user.target in _WEIGHT_NORM or user.target in _BROADCASTS or \
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
        return _einsum_operands(node)
    if node.target in BATCHED_TARGETS:
        _, _, (left, left_name), (right, right_name) = BATCHED_TARGETS[node.target]
        return [_arg(node, left, left_name), _arg(node, right, right_name)]
    return []


def _computed_weights(gm, uses: _Uses, sites: SiteTable) -> None:
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
                        f"({', '.join(sorted(ops)[:4])}); folding needs a parameter equal to "
                        "the weight (spectral_norm divides by a norm estimate, so no parameter "
                        "value reproduces an arbitrary W')"))


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
        stack.extend(a for a in _flatten([*current.args, *current.kwargs.values()])
                     if isinstance(a, fx.Node))
    return params, ops


def _higher_order_uses(gm, uses: _Uses) -> None:
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
    uses = _Uses()
    for node in gm.graph.nodes:
        if node.op == "call_module":
            if type(gm.get_submodule(node.target)).__name__ != "_WeightNorm":
                _record_module_call(gm, node, uses)
        elif node.op == "call_function":
            _record_function_call(gm, node, uses)
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
