"""Contraction pass: fold each branch into its site's weight, and drop it from the graph.

On the constraint set, ``ρ(t) = p·t + q`` per unit, so the branch is linear and::

    W' = W + B · diag(p) · A          b' = b + B · (p ⊙ a + q)

A site on rows of a packed parameter folds into those rows; a weight-norm site (W = g·v/‖v‖)
sets ``v ← W'`` and ``g ← ‖W'‖``, which reproduces ``W'``.

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


def _placed(delta: torch.Tensor, rows: tuple[int, int] | None, like: torch.Tensor):
    """``delta`` as an update of the whole parameter ``like`` (zero outside ``rows``)."""
    if rows is None:
        return delta
    full = torch.zeros(like.shape, dtype=torch.float64, device=like.device)
    full[rows[0]:rows[1]] = delta
    return full


def _current(new_values: NewValues, gm: fx.GraphModule, name: str) -> torch.Tensor:
    """A parameter's value in float64, with the updates already folded into it this round
    (two row-slice sites of one packed parameter both fold into it)."""
    if name in new_values:
        return new_values[name]
    return gm.get_parameter(name).detach().to(torch.float64)


def _fold_weight(new_values: NewValues, gm: fx.GraphModule, site: Site,
                 delta_w: torch.Tensor) -> None:
    if site.weight_norm is None:
        weight = _current(new_values, gm, site.weight_name)
        new_values[site.weight_name] = weight + _placed(delta_w, site.rows, weight)
        return
    # W = g·v/‖v‖ (norm over every dim but `dim`): v ← W', g ← ‖W'‖ gives back W' exactly
    g_name, dim = site.weight_norm
    v, g = _current(new_values, gm, site.weight_name), _current(new_values, gm, g_name)
    folded = torch._weight_norm(v, g, dim) + delta_w
    new_values[site.weight_name] = folded
    new_values[g_name] = torch.norm_except_dim(folded, 2, dim).reshape(g.shape)


def folded_values(gm: fx.GraphModule, sites: list[Site], branches: dict) -> NewValues:
    """New values of every weight and bias the branches fold into (one entry per parameter,
    also when a bias is shared or a packed parameter holds several sites' rows)."""
    new_values: NewValues = {}
    for site in sites:
        delta_w, delta_b = branch_deltas(site, branches[site.name])
        _fold_weight(new_values, gm, site, delta_w)
        if delta_b is None:
            continue
        for bias_name, rows in dict.fromkeys((u.bias_name, u.bias_rows) for u in site.uses):
            bias = _current(new_values, gm, bias_name)
            new_values[bias_name] = bias + _placed(delta_b, rows, bias)
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
