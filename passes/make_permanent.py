"""Grow pass: make an extension permanent — its branches become ordinary submodules.

The branch submodules move from the temporary ``morphc_ext`` namespace to
``morphc_grown.at_<site>`` and their nodes are re-tagged ``Role.GROWN_BRANCH`` / ``GROWN_ADD``, so
a later extend / contract round leaves them alone::

    morphc_ext_fc = self.morphc_ext.fc(x);  add = fc + morphc_ext_fc                  # before
    morphc_grown_at_fc = self.morphc_grown.at_fc(x);  add = fc + morphc_grown_at_fc    # after
"""

from __future__ import annotations

from morphc.passes.infra import PassResult, fresh_name, graph_pass
from torch import fx

from morphc.ir.tags import EXTENSION_PREFIX, GROWN_PREFIX, Role, is_temporary, tag, untag

_GROWN = {Role.EXTENSION: Role.GROWN_BRANCH, Role.EXTENSION_ADD: Role.GROWN_ADD}


def _nothing_temporary(gm: fx.GraphModule) -> str | None:
    left = [n.name for n in gm.graph.nodes if is_temporary(n)]
    return f"temporary extension nodes left after make_permanent: {left}" if left else None


@graph_pass(ensures=_nothing_temporary)
def make_permanent(gm: fx.GraphModule) -> PassResult[dict[str, str]]:
    """Rename and re-tag every extension branch of ``gm`` in place; ``analysis``: the renames
    ``{old submodule path: new}``."""
    renames: dict[str, str] = {}
    for node in gm.graph.nodes:
        old = untag(node)
        if old is not None and old.role in _GROWN:
            tag(node, _GROWN[old.role], old.site)
        if node.op == "call_module" and node.target.startswith(EXTENSION_PREFIX + "."):
            if node.target not in renames:
                site = node.target.split(".", 1)[1]
                renames[node.target] = fresh_name(gm, GROWN_PREFIX, f"at_{site}")
                gm.add_submodule(renames[node.target], gm.get_submodule(node.target))
            node.target = renames[node.target]
    if renames:
        gm.delete_submodule(EXTENSION_PREFIX)
    return PassResult(gm, modified=bool(renames), analysis=renames)
