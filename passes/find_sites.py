"""Analysis pass: find the extension sites of a graph and annotate their nodes.

Rules as data: each supported operator maps to how its weight, bias, input and hyper-parameters
are read. Export graphs (aten ops) and symbolic_trace graphs (``call_module`` / ``F.*``) share one
table, so the site table speaks in module paths and parameter names whichever frontend ran.
"""

from __future__ import annotations

import operator
from collections import defaultdict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from morphc.passes.infra import PassResult
from torch import fx, nn

from morphc.ir.sites import ConvConfig, Site, SiteTable, SiteUse
from morphc.ir.tags import Role, tag

aten = torch.ops.aten


@dataclass(frozen=True)
class _FunctionRule:
    """Where a functional site keeps its operands: positional index and keyword name."""

    kind: str                      # "linear" | "conv" | "matmul"
    label: str
    weight: tuple[int, str]
    bias: tuple[int, str] | None = None
    conv_dim: int | None = None    # None for convolution.default: read from the weight
    aten_convolution: bool = False


_LINEAR = dict(kind="linear", weight=(1, "weight"), bias=(2, "bias"))
_CONV = dict(kind="conv", weight=(1, "weight"), bias=(2, "bias"))
FUNCTION_RULES: dict[object, _FunctionRule] = {
    F.linear: _FunctionRule(label="F.linear", **_LINEAR),                      # x Wᵀ + b
    aten.linear.default: _FunctionRule(label="aten.linear", **_LINEAR),
    F.conv1d: _FunctionRule(label="F.conv1d", conv_dim=1, **_CONV),            # W ⋆ x + b
    F.conv2d: _FunctionRule(label="F.conv2d", conv_dim=2, **_CONV),
    F.conv3d: _FunctionRule(label="F.conv3d", conv_dim=3, **_CONV),
    aten.conv1d.default: _FunctionRule(label="aten.conv1d", conv_dim=1, **_CONV),
    aten.conv2d.default: _FunctionRule(label="aten.conv2d", conv_dim=2, **_CONV),
    aten.conv3d.default: _FunctionRule(label="aten.conv3d", conv_dim=3, **_CONV),
    aten.conv1d.padding: _FunctionRule(label="aten.conv1d", conv_dim=1, **_CONV),
    aten.conv2d.padding: _FunctionRule(label="aten.conv2d", conv_dim=2, **_CONV),
    aten.conv3d.padding: _FunctionRule(label="aten.conv3d", conv_dim=3, **_CONV),
    aten.convolution.default: _FunctionRule(label="aten.convolution", aten_convolution=True,
                                            **_CONV),
}
MATMUL_TARGETS = {operator.matmul: "@", torch.matmul: "torch.matmul", torch.mm: "torch.mm",
                  aten.matmul.default: "aten.matmul", aten.mm.default: "aten.mm"}
SITE_MODULES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _arg(node: fx.Node, index: int, name: str, default=None):
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _ntuple(value, dim: int) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * dim
    value = tuple(int(v) for v in value)
    return value * dim if len(value) == 1 else value


def _shape(node) -> tuple[int, ...] | None:
    if not isinstance(node, fx.Node):
        return None
    meta = node.meta.get("tensor_meta")
    shape = getattr(meta, "shape", None)
    if shape is None and isinstance(node.meta.get("val"), torch.Tensor):
        shape = node.meta["val"].shape
    if shape is None:
        return None
    return tuple(int(d) if not isinstance(d, torch.SymInt) else -1 for d in shape)


class _Uses:
    """Every use of every parameter, so a weight also used elsewhere is never folded into."""

    def __init__(self) -> None:
        self.site: dict[int, list[tuple[fx.Node, str, str | None, dict]]] = defaultdict(list)
        self.bias: dict[int, list[fx.Node]] = defaultdict(list)
        self.other: dict[int, list[str]] = defaultdict(list)
        self.names: dict[int, str] = {}
        self.tensors: dict[int, torch.Tensor] = {}

    def note(self, name: str, tensor: torch.Tensor) -> int:
        key = id(tensor)
        self.names.setdefault(key, name)
        self.tensors[key] = tensor
        return key


def _conv_from_module(m: nn.modules.conv._ConvNd) -> ConvConfig:
    padding = m.padding if isinstance(m.padding, str) else tuple(m.padding)
    return ConvConfig(len(m.kernel_size), tuple(m.kernel_size), tuple(m.stride), padding,
                      tuple(m.dilation), m.groups, m.padding_mode)


def _conv_from_node(node: fx.Node, rule: _FunctionRule, weight: torch.Tensor) -> ConvConfig:
    dim = rule.conv_dim or weight.dim() - 2
    if rule.aten_convolution:
        if _arg(node, 6, "transposed", False):
            raise NotImplementedError("transposed convolution")
        groups = _arg(node, 8, "groups", 1)
    else:
        groups = _arg(node, 6, "groups", 1)
    padding = _arg(node, 4, "padding", 0)
    return ConvConfig(
        dim, tuple(weight.shape[2:]), _ntuple(_arg(node, 3, "stride", 1), dim),
        padding if isinstance(padding, str) else _ntuple(padding, dim),
        _ntuple(_arg(node, 5, "dilation", 1), dim), int(groups),
    )


def _record_module_call(gm, node, uses: _Uses) -> None:
    module = gm.get_submodule(node.target)
    site_weight = module.weight if isinstance(module, SITE_MODULES) else None
    bias = getattr(module, "bias", None) if site_weight is not None else None
    for pname, tensor in module.named_parameters(prefix=node.target):
        key = uses.note(pname, tensor)
        if tensor is site_weight:
            bias_key = uses.note(f"{node.target}.bias", bias) if bias is not None else None
            if bias_key is not None:
                uses.bias[bias_key].append(node)
            label = f"nn.{type(module).__name__}"
            conv = _conv_from_module(module) if isinstance(module, nn.modules.conv._ConvNd) \
                else None
            uses.site[key].append((node, "linear" if conv is None else "conv", label,
                                   dict(conv=conv, bias_key=bias_key, input_arg=0,
                                        in_f=module.weight.shape[1] * (conv.groups if conv else 1),
                                        out_f=module.weight.shape[0], name=node.target)))
        elif tensor is not bias:
            uses.other[key].append(node.name)


def _param_node(gm, arg) -> tuple[str, torch.Tensor] | None:
    if isinstance(arg, fx.Node) and arg.op == "get_attr":
        try:
            tensor = gm.get_parameter(arg.target)
        except AttributeError:
            return None
        return arg.target, tensor
    return None


def _record_function_call(gm, node, uses: _Uses) -> set[fx.Node]:
    """Record a functional site; return the get_attr nodes it consumed as weight/bias."""
    rule = FUNCTION_RULES.get(node.target)
    if rule is not None:
        weight = _param_node(gm, _arg(node, *rule.weight))
        if weight is None:
            return set()
        bias_arg = _arg(node, *rule.bias)
        bias = _param_node(gm, bias_arg)
        consumed = {_arg(node, *rule.weight)} | ({bias_arg} if bias else set())
        try:
            conv = _conv_from_node(node, rule, weight[1]) if rule.kind == "conv" else None
        except NotImplementedError:
            return set()
        key = uses.note(*weight)
        bias_key = uses.note(*bias) if bias else None
        if bias_key is not None:
            uses.bias[bias_key].append(node)
        w = weight[1]
        uses.site[key].append((node, rule.kind, rule.label, dict(
            conv=conv, bias_key=bias_key, input_arg=0,
            in_f=w.shape[1] * (conv.groups if conv else 1), out_f=w.shape[0], name=None)))
        return consumed
    if node.target in MATMUL_TARGETS and len(node.args) == 2:
        for side, (param_arg, input_arg) in (("matmul_right", (1, 0)), ("matmul_left", (0, 1))):
            param = _param_node(gm, node.args[param_arg])
            if param is not None and param[1].dim() == 2:
                w = param[1]
                in_f, out_f = (w.shape[0], w.shape[1]) if side == "matmul_right" \
                    else (w.shape[1], w.shape[0])
                uses.site[uses.note(*param)].append((node, side, MATMUL_TARGETS[node.target], dict(
                    conv=None, bias_key=None, input_arg=input_arg, in_f=in_f, out_f=out_f,
                    name=None)))
                return {node.args[param_arg]}
    return set()


def _site_name(weight_name: str, module_name: str | None, taken: set[str]) -> str:
    name = module_name or weight_name.removesuffix(".weight")
    return name if name not in taken else weight_name


def _build_site(key: int, uses: _Uses, taken: set[str]) -> Site:
    entries = uses.site[key]
    node0, kind, _, info0 = entries[0]
    site = Site(name=_site_name(uses.names[key], info0["name"], taken), kind=kind,
                weight_name=uses.names[key], in_features=int(info0["in_f"]),
                out_features=int(info0["out_f"]), conv=info0["conv"])
    for node, use_kind, label, info in entries:
        bias_key = info["bias_key"]
        site.uses.append(SiteUse(
            node=node.name, op=label, input_arg=info["input_arg"],
            bias_name=uses.names[bias_key] if bias_key is not None else None,
            input_shape=_shape(node.args[info["input_arg"]]), output_shape=_shape(node)))
        if use_kind != kind or info["conv"] != site.conv:
            site.excluded = (f"weight {site.weight_name} is used by different operators "
                             f"({kind} at {node0.name}, {use_kind} at {node.name})")
        if bias_key is None or uses.other.get(bias_key):
            site.bias_foldable = False
    if uses.other.get(key):
        site.excluded = (f"weight {site.weight_name} is also used outside linear sites "
                         f"(by {', '.join(uses.other[key])}); folding into it would change them")
    if key in uses.bias:
        site.excluded = f"weight {site.weight_name} is also used as a bias"
    return site


def find_sites(gm: fx.GraphModule) -> PassResult[SiteTable]:
    """Find every extension site and tag its nodes ``Role.SITE`` (an analysis: the graph is not
    rewritten). ``analysis``: the :class:`~morphc.ir.sites.SiteTable`.
    """
    uses = _Uses()
    consumed: set[fx.Node] = set()
    for node in gm.graph.nodes:
        if node.op == "call_module":
            _record_module_call(gm, node, uses)
        elif node.op == "call_function":
            consumed |= _record_function_call(gm, node, uses)
    for node in gm.graph.nodes:  # any other use of a parameter blocks folding into it
        param = _param_node(gm, node) if node.op == "get_attr" else None
        if param is None:
            continue
        key = uses.note(*param)
        for user in node.users:
            if not (node in consumed and _is_site_operand(user, node, uses, key)):
                uses.other[key].append(user.name)
    table = SiteTable()
    for key in uses.site:
        site = _build_site(key, uses, set(table))
        table[site.name] = site
        for node in gm.graph.nodes:
            if node.name in site.node_names:
                tag(node, Role.SITE, site.name)
    return PassResult(gm, modified=False, analysis=table)


def _is_site_operand(user: fx.Node, operand: fx.Node, uses: _Uses, key: int) -> bool:
    """Is ``operand`` (a get_attr) used by ``user`` only as a recorded site weight or bias?"""
    recorded = [entry[0] for entry in uses.site.get(key, [])] + uses.bias.get(key, [])
    if user not in recorded:
        return False
    return sum(a is operand for a in [*user.args, *user.kwargs.values()]) == 1
