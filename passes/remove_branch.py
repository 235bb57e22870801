"""Ungrow pass: remove one grown branch exactly.

A site branch on C folds into its site's weight (the fold rule of ``fold_extension``); a residual
block with ``B = 0`` is dropped. The branch's nodes leave the graph in place; the new weight
values are *returned*, never written — the caller writes them all-or-nothing::

    morphc_grown_at_fc = self.morphc_grown.at_fc(x);  add = fc + morphc_grown_at_fc   # before
    fc = self.fc(x)                                       # after; W' = W + B·diag(p)·A
"""

from __future__ import annotations

from morphc.passes.find_grown_branches import GrownBranch
from morphc.passes.find_sites import find_sites
from morphc.passes.fold_extension import NewValues, folded_values
from morphc.passes.infra import PassResult, delete_submodules, remove_nodes
from torch import fx


def remove_branch(gm: fx.GraphModule, branch: GrownBranch) -> PassResult[NewValues]:
    """Remove ``branch`` (found by ``find_grown_branches`` on this graph); ``analysis``: the new
    values of the site's weight and bias (empty for a residual block)."""
    new_values: NewValues = {}
    if branch.site is not None:
        site = find_sites(gm).analysis[branch.site]
        new_values = folded_values(gm, [site], {site.name: branch.module(gm)})
    stand_in = {}
    for call, add in branch.nodes:      # the call reads x; the add stands for its other operand
        stand_in[call] = call.args[0]
        stand_in[add] = add.args[0] if add.args[1] is call else add.args[1]
    remove_nodes(gm, stand_in.get)
    delete_submodules(gm, [branch.target])
    return PassResult(gm, modified=True, analysis=new_values)
