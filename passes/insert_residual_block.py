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

Inserted nodes are tagged ``Role.RESIDUAL_BLOCK`` / ``Role.RESIDUAL_ADD`` (never the temporary
extension roles: a contraction must leave them alone).
"""

from __future__ import annotations

from dataclasses import dataclass

from morphc.passes.infra import PassResult, insert_added_call
from torch import fx, nn

from morphc.errors import SiteError
from morphc.ir.tags import Role


@dataclass
class InsertedBlock:
    block: fx.Node   # block(x)
    add: fx.Node     # x + block(x)


def insert_residual_block(gm: fx.GraphModule, at: str, block: nn.Module,
                          target: str) -> PassResult[InsertedBlock]:
    """Add ``block`` as submodule ``target`` and route every user of node ``at`` through
    ``at + block(at)``, in place."""
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
    block_node, add = insert_added_call(gm, node, target, node,
                                        (Role.RESIDUAL_BLOCK, Role.RESIDUAL_ADD))
    return PassResult(gm, modified=True, analysis=InsertedBlock(block_node, add))
