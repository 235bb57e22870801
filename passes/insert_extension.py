"""Extension pass: add a bypass branch at each chosen site.

For a site node ``z = site(x)`` it produces::

    z = site(x)                                  # unchanged, same module / weight
    ext = morphc_ext.<site>(x)                   # B · ρ_α(A x + a), B = 0
    z2 = z + ext                                 # every former user of z now reads z2

A tied weight (several nodes) gets one branch module called at each node.
"""

from __future__ import annotations

import operator

from morphc.passes.infra import PassResult
from torch import fx, nn

from morphc.ir.sites import ROLE_META, SITE_META, Site

EXTENSION_PREFIX = "morphc_ext"


def branch_target(site: Site) -> str:
    return f"{EXTENSION_PREFIX}.{site.name.replace('.', '_')}"


def _input_of(node: fx.Node, index: int) -> fx.Node:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get("input", node.kwargs.get("other"))


def insert_extension(gm: fx.GraphModule, sites: list[Site],
                     branches: dict[str, nn.Module]) -> PassResult:
    """Insert ``branches[site.name]`` at every use of every site; returns the same gm, rewritten.

    Returns ``PassResult(gm, modified, info={site name: branch target})``.
    """
    nodes = {n.name: n for n in gm.graph.nodes}
    targets: dict[str, str] = {}
    for site in sites:
        target = branch_target(site)
        if target in targets.values():
            raise ValueError(f"two sites map to branch name {target!r}")
        gm.add_submodule(target, branches[site.name])
        targets[site.name] = target
        for use in site.uses:
            node = nodes[use.node]
            with gm.graph.inserting_after(node):
                branch = gm.graph.call_module(target, (_input_of(node, use.input_arg),))
            with gm.graph.inserting_after(branch):
                total = gm.graph.call_function(operator.add, (node, branch))
            node.replace_all_uses_with(total, delete_user_cb=lambda user, t=total: user is not t)
            branch.meta[ROLE_META] = "extension"
            total.meta[ROLE_META] = "extension_add"
            for new in (branch, total):
                new.meta[SITE_META] = site.name
                for key in ("tensor_meta", "val"):
                    if key in node.meta:
                        new.meta[key] = node.meta[key]
    return PassResult(gm, modified=bool(targets), info=targets)
