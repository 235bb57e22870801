"""Contraction pass: fold each branch into its site's weight, and drop it from the graph.

On the constraint set, ``ρ(t) = p·t + q`` per unit, so the branch is linear and::

    W' = W + B · diag(p) · A          b' = b + B · (p ⊙ a + q)

The fold rule of each operator kind lives in its :mod:`~morphc.ir.kinds` strategy. Arithmetic
runs in float64. The pass removes the branch nodes from the graph it is given and *computes* the
new weights without writing them: the caller applies them all-or-nothing
(``morphc.compiler.write``), and runs the pass on a fork when it needs the extended graph after.
"""

from __future__ import annotations

import torch
from morphc.passes.infra import PassResult, delete_submodules, graph_pass, remove_nodes
from torch import fx

from morphc.ir.kinds import bias_delta
from morphc.ir.sites import Site
from morphc.ir.tags import is_temporary

NewValues = dict[str, torch.Tensor]   # parameter qualified name -> folded value (float64)


def branch_deltas(site: Site, branch) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(ΔW, Δb)`` in float64 for one branch at its current effective α (assumed on C)."""
    with torch.no_grad():
        p, q = (t.to(torch.float64).reshape(-1) for t in branch.affine_form())
        A = branch.A.detach().to(torch.float64)
        B = branch.B.detach().to(torch.float64).reshape(branch.B.shape[0], -1)
        delta_w = branch.strategy.fold(A, B, p, site.groups)
        offset = q.expand(branch.width).clone()
        if branch.a is not None:
            offset = offset + p * branch.a.detach().to(torch.float64)
        delta_b = bias_delta(B, offset, site.groups) if not branch.zero_offset else None
    return delta_w, delta_b


def folded_values(gm: fx.GraphModule, sites: list[Site], branches: dict) -> NewValues:
    """New values of every weight and bias the branches fold into (one entry per parameter,
    also when a bias is shared)."""
    new_values: NewValues = {}
    for site in sites:
        delta_w, delta_b = branch_deltas(site, branches[site.name])
        weight = gm.get_parameter(site.weight_name)
        new_values[site.weight_name] = weight.detach().to(torch.float64) + delta_w
        if delta_b is None:
            continue
        for bias_name in dict.fromkeys(u.bias_name for u in site.uses):
            bias = gm.get_parameter(bias_name)
            new_values[bias_name] = bias.detach().to(torch.float64) + delta_b
    return new_values


def _no_temporary_node(gm: fx.GraphModule) -> str | None:
    left = [n.name for n in gm.graph.nodes if is_temporary(n)]
    return f"extension nodes survived the fold: {left}" if left else None


@graph_pass(ensures=_no_temporary_node)
def fold_extension(gm: fx.GraphModule, sites: list[Site],
                   branches: dict) -> PassResult[NewValues]:
    """Remove every extension node of ``gm`` (a branch call reads ``x``, its add ``z``: users
    read those instead) and return the folded weights as ``analysis``."""
    new_values = folded_values(gm, sites, branches)
    calls = [n.target for n in gm.graph.nodes if is_temporary(n) and n.op == "call_module"]
    remove_nodes(gm, lambda node: node.args[0] if is_temporary(node) else None)
    delete_submodules(gm, calls)
    return PassResult(gm, modified=True, analysis=new_values)
