"""Analysis pass: find the branches a graph keeps for good, from its structure alone.

A grown branch is a ``BypassBranch`` call whose output is added either to the output of the site
that reads the same input (``z + B·ρ(Ax + a)``, foldable on C) or to its own input (a residual
block ``x + B·ρ(Ax + a)``, removable while ``B = 0``). Structure, not tags, decides, so it works on
graphs loaded from files too.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

from morphc.passes.find_sites import find_sites
from morphc.passes.infra import PassResult
from torch import fx

from morphc.ir.branch import BypassBranch
from morphc.ir.sites import input_of


@dataclass
class GrownBranch:
    """One grown branch: at a site, or a residual block (``site`` None)."""

    target: str                 # submodule path of the branch
    site: str | None            # site name for a site branch, None for a residual block
    nodes: list[tuple[fx.Node, fx.Node]]   # (branch call, add) per use

    def module(self, gm: fx.GraphModule) -> BypassBranch:
        return gm.get_submodule(self.target)


def _is_branch_call(gm: fx.GraphModule, node) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_module" and \
        isinstance(gm.get_submodule(node.target), BypassBranch)


def _past_branches(gm: fx.GraphModule, node, x: fx.Node):
    """Skip ``add(·, branch(x))`` nodes of other branches at the same site (Grow twice)."""
    while isinstance(node, fx.Node) and node.op == "call_function" and \
            node.target is operator.add and len(node.args) == 2:
        branch = [a for a in node.args if _is_branch_call(gm, a) and a.args[0] is x]
        if len(branch) != 1:
            break
        node = node.args[0] if node.args[1] is branch[0] else node.args[1]
    return node


def find_grown_branches(gm: fx.GraphModule) -> PassResult[list[GrownBranch]]:
    """Every grown branch of ``gm`` (an analysis: site nodes get their tags, nothing else)."""
    by_name = {n.name: n for n in gm.graph.nodes}
    site_inputs = {}     # site node -> (site name, the input its branch must read)
    for site in find_sites(gm).analysis.values():
        for use in site.uses:
            node = by_name[use.node]
            site_inputs[node] = (site.name, input_of(node, use.input_arg))
    found: dict[str, GrownBranch] = {}
    for node in gm.graph.nodes:
        if not _is_branch_call(gm, node):
            continue
        users = list(node.users)
        if len(users) != 1 or users[0].target is not operator.add or len(users[0].args) != 2:
            continue
        add, x = users[0], node.args[0]
        other = _past_branches(gm, add.args[0] if add.args[1] is node else add.args[1], x)
        site = None
        if other is not x:
            site, site_input = site_inputs.get(other, (None, None))
            if site is None or site_input is not x:
                continue
        entry = found.setdefault(node.target, GrownBranch(node.target, site, []))
        entry.nodes.append((node, add))
    return PassResult(gm, modified=False, analysis=list(found.values()))
