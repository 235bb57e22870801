"""Where ``Deepen`` can insert a residual block, and in which layout: the activation tensors
whose units a block can act on, read from the graph (the op that produced them, whether
anything reads them after an in-place op).

Apart from the moves themselves because the model-space search lists these points without
moving anything.
"""

from __future__ import annotations

import operator

import torch
from torch import fx, nn

from morphc.errors import SiteError
from morphc.ir.ops import (
    ACTIVATION_FUNCTIONS,
    ACTIVATION_METHODS,
    ACTIVATION_MODULES,
    CHANNEL_FUNCTIONS,
    CHANNEL_MODULES,
    ELEMENTWISE_FUNCTIONS,
    ELEMENTWISE_METHODS,
    ELEMENTWISE_MODULES,
    NORMS,
    in_place,
)
from morphc.passes.widen_layer import SITES


def tensor_layout(gm: fx.GraphModule, node: fx.Node, kind: str) -> tuple[str, int]:
    """``(kind, conv dim)`` of a tensor: rank 2 is features; otherwise the nearest site that
    produced it through layout-keeping ops decides (a Linear: features last, as in a ConvNeXt
    block's ``(N, H, W, C)``; a conv: channels first); without one, rank 4/5 is channels
    first and rank 3 is ambiguous."""
    rank = len(node.meta["tensor_meta"].shape)
    if kind == "linear" or (kind == "auto" and rank == 2):
        return "linear", 0
    if kind == "conv":
        if rank < 3:
            raise SiteError(f"a conv block needs a (N, C, ...) tensor; {node.name} has rank {rank}")
        return "conv", rank - 2
    producer = node
    while producer.op != "placeholder" and producer.all_input_nodes:
        if producer.op == "call_module":
            site = gm.get_submodule(producer.target)
            if isinstance(site, SITES):
                return ("linear", 0) if isinstance(site, nn.Linear) else ("conv", rank - 2)
        if not _keeps_layout(gm, producer):
            break       # a transpose, view, … between: the site's layout says nothing here
        producer = producer.all_input_nodes[0]
    if rank in (4, 5):
        return "conv", rank - 2
    raise SiteError(f"cannot tell whether {node.name} (rank {rank}) is (N, C, L) or (N, L, C); "
                    "pass kind='conv' or kind='linear'")


_SAME_SHAPE_OPS = {operator.add, operator.sub, operator.mul, operator.truediv, torch.add,
                   torch.sub, torch.mul, torch.div}


def _keeps_layout(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether ``node``'s output has its first input's dimensions in the same order: per-unit
    ops, norms, pooling, and arithmetic between tensors of the output's shape."""
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), ELEMENTWISE_MODULES + NORMS
                          + CHANNEL_MODULES + (nn.LayerNorm, nn.GroupNorm, nn.PReLU))
    if node.op == "call_method" and node.target in ELEMENTWISE_METHODS:
        return True
    if node.op != "call_function":
        return False
    if node.target in ELEMENTWISE_FUNCTIONS | CHANNEL_FUNCTIONS:
        return True
    shape = getattr(node.meta.get("tensor_meta"), "shape", None)
    return node.target in _SAME_SHAPE_OPS and shape is not None and all(
        getattr(n.meta.get("tensor_meta"), "shape", None) == shape for n in node.all_input_nodes)


def deepen_points(gm: fx.GraphModule) -> list[str]:
    """Names of activation nodes with a known shape whose layout ``tensor_layout`` can tell (rank 2,
    4 or 5, or 3 with a site upstream): where ``Deepen`` can insert a block."""
    points = []
    for node in gm.graph.nodes:
        is_act = (node.op == "call_module" and isinstance(gm.get_submodule(node.target),
                                                           ACTIVATION_MODULES)) or \
            (node.op == "call_function" and node.target in ACTIVATION_FUNCTIONS) or \
            (node.op == "call_method" and node.target in ACTIVATION_METHODS)
        if not is_act or "tensor_meta" not in node.meta or why_unread(gm, node) is not None:
            continue
        try:
            tensor_layout(gm, node, "auto")
        except SiteError:
            continue
        points.append(node.name)
    return points


def why_unread(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """Why a block after ``node`` would not be on the path its value takes (None: it would).
    An in-place op (``h.relu_()``, ``F.relu(h, inplace=True)``) leaves its result in its input
    too: a later reader of the input would bypass the block, and a statement-form call (its
    result unused) would leave the block dead."""
    if not node.users:
        return f"nothing reads {node.name} (an in-place op whose result is unused?)"
    source = node.all_input_nodes[0] if node.all_input_nodes else None
    if in_place(gm, node) and source is not None and list(source.users) != [node]:
        return (f"{node.name} works in place on {source.name}, which "
                f"{', '.join(u.name for u in source.users if u is not node)} also read")
    return None
