"""Every mark morphc leaves on a graph, in one place.

A node morphc cares about carries one :class:`NodeTag` under ``node.meta[NODE_TAG]``: what the node
is to morphc (its :class:`Role`) and which site it belongs to. Passes write tags, analyses and
pictures read them; nothing else reads ``node.meta`` for morphc's own marks. Submodules morphc adds
live under the prefixes below, and ``graph_module.meta[FRONTEND]`` names the frontend that made a
graph.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from torch import fx

NODE_TAG = "morphc"                # node.meta key: a NodeTag
FRONTEND = "morphc_frontend"       # graph_module.meta key: "symbolic_trace" | "export"
EXTENSION_PREFIX = "morphc_ext"    # temporary branches (removed by a fold)
GROWN_PREFIX = "morphc_grown"      # branches made permanent
DEEP_PREFIX = "morphc_deep"        # residual blocks


class Role(enum.StrEnum):
    """What a node is to morphc; a ``StrEnum``, so it prints and serialises as its value."""

    SITE = "site"                       # applies a site's weight: z = W x + b
    EXTENSION = "extension"             # a temporary branch B·ρ(Ax + a), folded by contract
    EXTENSION_ADD = "extension_add"     # z + branch
    GROWN_BRANCH = "grown_branch"       # a branch kept for good (model space: Grow)
    GROWN_ADD = "grown_add"
    RESIDUAL_BLOCK = "residual_block"   # x + block(x) (model space: Deepen)
    RESIDUAL_ADD = "residual_add"


TEMPORARY = frozenset({Role.EXTENSION, Role.EXTENSION_ADD})   # what a fold removes


@dataclass(frozen=True)
class NodeTag:
    role: Role
    site: str | None = None


def tag(node: fx.Node, role: Role, site: str | None = None) -> None:
    node.meta[NODE_TAG] = NodeTag(Role(role), site)


def untag(node: fx.Node) -> NodeTag | None:
    return node.meta.pop(NODE_TAG, None)


def tag_of(node: fx.Node) -> NodeTag | None:
    return node.meta.get(NODE_TAG)


def tags_by_name(gm: fx.GraphModule) -> dict[str, NodeTag]:
    """Every tag of ``gm``, by node name: what a pickled GraphModule loses (it is rebuilt from
    its generated code, with the same node names and no ``meta``)."""
    return {node.name: found for node in gm.graph.nodes if (found := tag_of(node)) is not None}


def restore_tags(gm: fx.GraphModule, tags: dict[str, NodeTag]) -> None:
    """Put back what :func:`tags_by_name` saved."""
    for node in gm.graph.nodes:
        if node.name in tags:
            node.meta[NODE_TAG] = tags[node.name]


def role_of(node: fx.Node) -> Role | None:
    found = tag_of(node)
    return None if found is None else found.role


def site_of(node: fx.Node) -> str | None:
    found = tag_of(node)
    return None if found is None else found.site


def is_temporary(node: fx.Node) -> bool:
    """A node of a temporary extension (a branch call or its add): what a fold removes."""
    return role_of(node) in TEMPORARY
