"""Op tables: which modules, functions and methods a graph analysis may treat alike.

Kept in one place so that "is this an activation?" has one answer everywhere (deepening points,
widening chains, pictures).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

aten = torch.ops.aten

# Modules that own one linear weight a widening or a grown branch can act on.
LINEAR_MODULES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)

# Non-linearities applied per unit.
ACTIVATION_MODULES = (nn.ReLU, nn.ReLU6, nn.Tanh, nn.Sigmoid, nn.GELU, nn.SiLU, nn.Mish,
                      nn.LeakyReLU, nn.ELU, nn.Hardtanh, nn.Softplus, nn.PReLU)
ACTIVATION_FUNCTIONS = frozenset({
    torch.relu, torch.tanh, torch.sigmoid, F.relu, F.relu6, F.gelu, F.silu, F.mish, F.elu,
    F.leaky_relu, F.hardtanh, F.softplus, F.tanh, F.sigmoid,
    aten.relu.default, aten.gelu.default, aten.tanh.default})
ACTIVATION_METHODS = frozenset({"relu", "tanh", "sigmoid"})

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
