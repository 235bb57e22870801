"""Extension pass: add a bypass branch at each chosen site.

For a site node ``z = site(x)`` it produces::

    z = site(x)                                  # unchanged, same module / weight
    ext = morphc_ext.<site>(x)                   # B · ρ_α(A x + a), B = 0
    z2 = z + ext                                 # every former user of z now reads z2

A tied weight (several nodes) gets one branch module called at each node.
"""

from __future__ import annotations

from morphc.passes.infra import PassResult, graph_pass, insert_added_call
from torch import fx, nn

from morphc.ir.sites import Site, input_of
from morphc.ir.tags import EXTENSION_PREFIX, Role, role_of


def branch_target(site: Site) -> str:
    return f"{EXTENSION_PREFIX}.{site.name.replace('.', '_')}"


def _each_branch_feeds_one_add(gm: fx.GraphModule) -> str | None:
    for node in gm.graph.nodes:
        if role_of(node) is Role.EXTENSION and \
                [role_of(u) for u in node.users] != [Role.EXTENSION_ADD]:
            return f"extension node {node.format_node()} must feed exactly one extension add"
    return None


@graph_pass(ensures=_each_branch_feeds_one_add)
def insert_extension(gm: fx.GraphModule, sites: list[Site],
                     branches: dict[str, nn.Module]) -> PassResult[dict[str, str]]:
    """Insert ``branches[site.name]`` at every use of every site, in place.

    ``analysis``: ``{site name: branch submodule path}``.
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
            insert_added_call(gm, node, target, input_of(node, use.input_arg),
                              (Role.EXTENSION, Role.EXTENSION_ADD), site.name)
    return PassResult(gm, modified=bool(targets), analysis=targets)
