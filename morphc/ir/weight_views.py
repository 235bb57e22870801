"""A weight operand that is its parameter viewed back into the parameter's own shape.

Models hand an operator its weight through shape-only views that end where they started:
Hugging Face's Mamba calls ``F.conv1d(x, conv1d.weight.squeeze(1).unsqueeze(1), groups=C)``
(its kernel helper takes a 2-D weight); others ``W.reshape(out, in)`` a weight already of that
shape. view / reshape / squeeze / unsqueeze / flatten / unflatten keep the elements' row-major
order, so a chain of them that returns to the parameter's shape *is* the parameter, element for
element, and a fold written into the parameter reaches the operator unchanged. A chain that ends
in another shape stays an exclusion.
"""

from __future__ import annotations

import torch
from torch import fx
from torch.utils import _pytree

aten = torch.ops.aten

_VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.squeeze.dim,
          aten.squeeze.dims, aten.squeeze.default, aten.unsqueeze.default,
          aten.flatten.using_ints, aten.unflatten.int, torch.reshape, torch.squeeze,
          torch.unsqueeze, torch.flatten, torch.unflatten, "view", "reshape", "squeeze",
          "unsqueeze", "flatten", "unflatten"}


def view_chain(arg) -> tuple[fx.Node, list[fx.Node]] | None:
    """``(the node under a chain of views, the chain from the operand inwards)``, or None when
    ``arg`` is not a view."""
    chain, node = [], arg
    while isinstance(node, fx.Node) and node.op in ("call_function", "call_method") and \
            is_view(node.target) and node.args:
        chain.append(node)
        node = node.args[0]
    return (node, chain) if chain else None


def returns_to_shape(chain: list[fx.Node], shape: torch.Size) -> bool:
    """Whether ``chain`` (innermost last) applied to a tensor of ``shape`` gives ``shape`` back;
    False when a size is only known at run time."""
    tensor = torch.empty(shape, device="meta")
    for link in reversed(chain):
        rest, kwargs = list(link.args[1:]), dict(link.kwargs)
        if any(isinstance(a, fx.Node | torch.SymInt) for a in _pytree.tree_leaves((rest, kwargs))):
            return False
        try:
            tensor = getattr(tensor, link.target)(*rest, **kwargs) \
                if isinstance(link.target, str) else link.target(tensor, *rest, **kwargs)
        except (RuntimeError, TypeError, ValueError, IndexError):
            return False
    return tuple(tensor.shape) == tuple(shape)


def is_view(target) -> bool:
    try:
        return target in _VIEWS
    except TypeError:          # an unhashable target is no view
        return False
