"""Every use of every parameter in a graph, recorded node by node: the facts ``find_sites``
decides from.

Rules as data (:mod:`morphc.ir.site_rules`) say how each operator reads its weight, bias and
input; a weight operand is resolved through the ways models build it from a parameter (row
slices of a packed parameter, weight norm, transposes, broadcasts over a batch). An ``einsum``
that is a linear map of one input by a 2-D parameter, and ``bmm`` / ``baddbmm`` against a 2-D
parameter broadcast over the batch, are uses of the existing kinds (:mod:`morphc.ir.einsum_map`);
anything else that reads a linear-operator weight is recorded as an exclusion with its reason.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torch import fx, nn

from morphc.ir.einsum_map import einsum_map
from morphc.ir.site_rules import (
    _BATCHED_3D,
    _BATCHED_OTHER,
    _BROADCASTS,
    _EXPERT_GATHERS,
    _EXPERTS,
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
    is_grouped_mm,
    resolve_broadcast,
)
from morphc.ir.sites import ConvConfig


@dataclass
class Use:
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
class Uses:
    """Every use of every parameter, so a weight also used elsewhere is never folded into."""

    site: dict[tuple, list[Use]] = field(default_factory=lambda: defaultdict(list))
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


def record_module_call(gm, node, uses: Uses) -> None:
    module = gm.get_submodule(node.target)
    for cls, reason in EXCLUDED_MODULES:
        if isinstance(module, cls):
            for pname, tensor in module.named_parameters(prefix=node.target):
                uses.note(pname, tensor)
                uses.exclusions.setdefault(pname, reason)
                uses.other[id(tensor)].append(node.name)
            return
    site_weight = module.weight if isinstance(module, SITE_MODULES) else None
    if site_weight is not None and "weight" not in module._parameters:
        _record_hooked_weight(node, module, uses)
        return
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
            uses.site[(key, None)].append(Use(
                node, kind, f"nn.{type(module).__name__}", _Ref(pname, tensor, []), bias_ref, 0,
                in_f, out_f, conv, node.target))
        elif tensor is not bias:
            uses.other[key].append(node.name)


def _record_hooked_weight(node: fx.Node, module: nn.Module, uses: Uses) -> None:
    """A Linear / conv whose ``weight`` is no Parameter: a forward pre-hook computes it each call
    from its own parameters (the old ``torch.nn.utils.spectral_norm`` / ``weight_norm``)."""
    names = [n for n, _ in module.named_parameters(recurse=False) if n != "bias"]
    reason = (f"{node.target}.weight is no Parameter: a forward pre-hook computes it each call "
              f"from {', '.join(names) or 'buffers'} (torch.nn.utils.spectral_norm or the old "
              "weight_norm), and no value of them is known to give an arbitrary folded W'; "
              "use torch.nn.utils.parametrizations.weight_norm (a site), or leave it out")
    for pname, tensor in module.named_parameters(prefix=node.target, recurse=False):
        uses.note(pname, tensor)
        uses.other[id(tensor)].append(node.name)
        if tensor is not module.bias:
            uses.exclusions.setdefault(pname, reason)


def _record_rule(gm, node, rule: _FunctionRule, uses: Uses) -> None:
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
        kind = {"matmul_right": "linear", "linear": "matmul_right"}.get(kind)
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
    uses.site[weight.key].append(Use(node, kind, rule.label, weight, bias, rule.input,
                                      in_f, out_f, conv))


def einsum_operands(node: fx.Node) -> list:
    """``einsum(eq, [a, b])`` (export) or ``einsum(eq, a, b)`` (symbolic_trace)."""
    return list(node.args[1]) if isinstance(node.args[1], list | tuple) else list(node.args[1:])


def _add_site(uses: Uses, node, kind, label, ref: _Ref, bias: _Ref | None, input_arg) -> None:
    """Record ``node`` as a use of the 2-D weight ``ref`` by a site of ``kind``."""
    in_f, out_f = _features(kind, tuple(ref.tensor.shape), None)
    uses.consume(node, ref)
    uses.consume(node, bias)
    uses.note(ref.name, ref.tensor)
    if bias is not None:
        uses.note(bias.name, bias.tensor)
        uses.bias[id(bias.tensor)].append(node)
    uses.site[ref.key].append(Use(node, kind, label, ref, bias, input_arg, in_f, out_f))


def _record_einsum(gm, node, uses: Uses) -> None:
    """An einsum against a 2-D parameter that is a linear map of the other operand is a site of
    the kind it maps onto (:mod:`morphc.ir.einsum_map`); any other is an explained exclusion."""
    operands = einsum_operands(node)
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


def _record_batched(gm, node, uses: Uses) -> None:
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
            if root is None and _record_experts(gm, label, operand, uses):
                continue
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


def _expert_source(gm, operand):
    """The stack of expert weights (a parameter of 3 or more dimensions) that ``operand`` is a
    slice or view of, if any (``W[ids]``, ``W[e]``, ``W.transpose(-2, -1)``)."""
    while isinstance(operand, fx.Node) and operand.target in _EXPERT_GATHERS:
        operand = operand.args[0]
    root = _param_node(gm, operand)
    return root if root is not None and root[1].dim() >= 3 else None


def _record_experts(gm, op: str, operand, uses: Uses) -> bool:
    """A matmul against per-token slices of stacked expert weights (mixture of experts) is an
    explained exclusion, not a silent gap in the site table."""
    root = _expert_source(gm, operand)
    if root is None:
        return False
    name, tensor = root
    uses.note(name, tensor)
    uses.exclusions.setdefault(name, _EXPERTS.format(op=op, name=name, shape=tuple(tensor.shape)))
    return True


def record_function_call(gm, node, uses: Uses) -> None:
    if is_grouped_mm(node.target):
        for leaf in flatten([*node.args, *node.kwargs.values()]):
            _record_experts(gm, str(node.target), leaf, uses)
        return
    rule = FUNCTION_RULES.get(node.target)
    if rule is not None:
        _record_rule(gm, node, rule, uses)
        return
    if node.target in EXCLUDED_TARGETS:
        for leaf in flatten([*node.args, *node.kwargs.values()]):
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
            uses.site[ref.key].append(Use(node, kind, MATMUL_TARGETS[node.target], ref, None,
                                           input_arg, in_f, out_f))
            return


def flatten(value):
    if isinstance(value, list | tuple):
        for v in value:
            yield from flatten(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from flatten(v)
    else:
        yield value
