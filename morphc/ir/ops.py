"""Op tables: which modules, functions and methods a graph analysis may treat alike.

Kept in one place so that "is this an activation?" has one answer everywhere (deepening points,
widening chains, pictures).
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch import fx, nn

aten = torch.ops.aten

# Modules that own one linear weight a widening or a grown branch can act on.
LINEAR_MODULES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)

# Non-linearities applied per unit. Every one but PReLU is parameter-free and deterministic
# (RReLU draws a slope per element in train mode, GLU halves its input: neither is listed).
ACTIVATION_MODULES = (nn.ReLU, nn.ReLU6, nn.Tanh, nn.Sigmoid, nn.GELU, nn.SiLU, nn.Mish,
                      nn.LeakyReLU, nn.ELU, nn.Hardtanh, nn.Softplus, nn.PReLU, nn.Hardswish,
                      nn.Hardsigmoid, nn.SELU, nn.CELU, nn.Softsign, nn.LogSigmoid,
                      nn.Tanhshrink, nn.Softshrink, nn.Hardshrink, nn.Threshold)
ACTIVATION_FUNCTIONS = frozenset({
    torch.relu, torch.tanh, torch.sigmoid, torch.selu, torch.celu, F.relu, F.relu6, F.gelu,
    F.silu, F.mish, F.elu, F.leaky_relu, F.hardtanh, F.softplus, F.tanh, F.sigmoid,
    F.hardswish, F.hardsigmoid, F.selu, F.celu, F.softsign, F.logsigmoid, F.tanhshrink,
    F.softshrink, F.hardshrink, F.threshold,
    # in place (the same builtins as torch.relu_ …)
    F.relu_, F.elu_, F.leaky_relu_, F.hardtanh_, F.selu_, F.celu_, F.threshold_,
    torch.sigmoid_, torch.tanh_,
    aten.relu.default, aten.gelu.default, aten.tanh.default, aten.sigmoid.default,
    aten.silu.default, aten.mish.default, aten.elu.default, aten.selu.default,
    aten.celu.default, aten.leaky_relu.default, aten.hardtanh.default, aten.softplus.default,
    aten.hardswish.default, aten.hardsigmoid.default, aten.log_sigmoid.default,
    aten.softshrink.default, aten.hardshrink.default, aten.threshold.default,
    aten.relu_.default, aten.sigmoid_.default, aten.tanh_.default, aten.silu_.default,
    aten.hardswish_.default, aten.hardsigmoid_.default, aten.hardtanh_.default,
    aten.leaky_relu_.default, aten.elu_.default, aten.selu_.default, aten.celu_.default})
ACTIVATION_METHODS = frozenset({"relu", "tanh", "sigmoid", "relu_", "tanh_", "sigmoid_"})

# Ops under which copies of a unit stay copies (parameter-free, per unit): what widening may
# pass through. PReLU is not among them: its per-channel slope would have to be widened too.
ELEMENTWISE_MODULES = tuple(m for m in ACTIVATION_MODULES if m is not nn.PReLU) + \
    (nn.Identity, nn.Dropout)
ELEMENTWISE_FUNCTIONS = ACTIVATION_FUNCTIONS | {F.dropout}
ELEMENTWISE_METHODS = ACTIVATION_METHODS | {"contiguous"}
# The same, for ops that need the units on dim 1 (pooling, channel dropout).
CHANNEL_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d,
                   nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
                   nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)
CHANNEL_FUNCTIONS = frozenset({F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d,
                               F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d,
                               F.adaptive_avg_pool2d, F.adaptive_avg_pool3d})


def in_place(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether ``node`` writes into its input (``x.relu_()``, ``F.relu(x, inplace=True)``,
    ``nn.ReLU(inplace=True)``): its input then holds its result too, and a reader of the input
    sees the activation without anything inserted after the node."""
    if node.op == "call_module":
        return bool(getattr(gm.get_submodule(node.target), "inplace", False))
    if node.op == "call_function" and _inplace_argument(node):
        return True
    name = node.target if node.op == "call_method" else \
        getattr(node.target, "__name__", "") if node.op == "call_function" else ""
    if isinstance(node.target, torch._ops.OpOverload):
        name = node.target._schema.name
    return isinstance(name, str) and name.endswith("_") and not name.endswith("__")


def _inplace_argument(node: fx.Node) -> bool:
    """``inplace=True`` given by keyword or by position (``F.relu(x, True)``)."""
    if node.kwargs.get("inplace", False) is True:
        return True
    try:
        bound = inspect.signature(node.target).bind(*node.args, **node.kwargs)
    except (TypeError, ValueError):     # a builtin without a signature, or no such call
        return False
    return bound.arguments.get("inplace", False) is True
