"""Deepening pass: insert a residual block ``y = x + block(x)`` on an activation tensor ``x``.

The caller builds ``block`` so that it outputs exactly zero at first (e.g. a ``BypassBranch``
``B·ρ(Ax + a)`` with in = out = channels and ``B = 0``), so ``y == x`` bit for bit and every later
node computes what it computed before. Training then moves ``B`` off zero: a new layer that
started as the identity.

Before and after ``insert_residual_block(gm, "relu", block, "morphc_deep.block0")``::

    relu = torch.relu(linear);  linear_1 = self.fc2(relu)

    relu = torch.relu(linear)
    morphc_deep_block0 = self.morphc_deep.block0(relu)
    add = relu + morphc_deep_block0;  linear_1 = self.fc2(add)

Inserted nodes carry ``node.meta['morphc_space_role']`` = ``"residual_block"`` /
``"residual_add"`` (not ``morphc_role``: the contraction pass removes nodes with that key).
"""

from __future__ import annotations

import operator

from morphc.passes.infra import PassResult
from torch import fx, nn

from morphc.errors import SiteError

SPACE_ROLE_META = "morphc_space_role"


def insert_residual_block(gm: fx.GraphModule, at: str, block: nn.Module,
                          target: str) -> PassResult:
    """Add ``block`` as submodule ``target`` and route every user of node ``at`` through
    ``at + block(at)``. Returns ``PassResult(gm, True, info={"block": node, "add": node})``."""
    nodes = {n.name: n for n in gm.graph.nodes}
    node = nodes.get(at)
    if node is None or node.op in ("output", "get_attr"):
        tensors = [n.name for n in gm.graph.nodes if n.op not in ("output", "get_attr")]
        raise SiteError(f"no tensor node {at!r} to deepen at; nodes: {', '.join(tensors)}")
    try:
        gm.get_submodule(target)
    except AttributeError:
        pass
    else:
        raise SiteError(f"submodule {target!r} already exists; choose another block name")
    gm.add_submodule(target, block)
    with gm.graph.inserting_after(node):
        block_node = gm.graph.call_module(target, (node,))
    with gm.graph.inserting_after(block_node):
        add = gm.graph.call_function(operator.add, (node, block_node))
    node.replace_all_uses_with(add, delete_user_cb=lambda user: user not in (block_node, add))
    block_node.meta[SPACE_ROLE_META] = "residual_block"
    add.meta[SPACE_ROLE_META] = "residual_add"
    for key in ("tensor_meta", "val"):
        if key in node.meta:
            block_node.meta[key] = add.meta[key] = node.meta[key]
    return PassResult(gm, modified=True, info={"block": block_node, "add": add})
