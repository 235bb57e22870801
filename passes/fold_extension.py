"""Contraction pass: fold each branch into its site's weight, and drop it from the graph.

On the constraint set, ``ρ(t) = p·t + q`` per unit, so the branch is linear and::

    W' = W + B · diag(p) · A          b' = b + B · (p ⊙ a + q)

Fold rules are data, one per operator kind; for (grouped) convs ``A`` is a k-channel conv and ``B``
a 1×1 conv, composed per group into one kernel of W's shape. Arithmetic runs in float64 and is cast
once. The pass computes new tensors but writes nothing: the caller applies them all-or-nothing.
"""

from __future__ import annotations

import torch
from morphc.passes.infra import PassResult, copy_graph_module
from torch import fx

from morphc.ir.sites import ROLE_META, Site


def _fold_linear(A, B, p):          # ΔW[o,i] = Σ_k B[o,k] p[k] A[k,i]
    return (B * p) @ A


def _fold_conv(A, B, p, groups):    # per group g: ΔW_g = B_g · diag(p_g) · A_g (A_g a kernel stack)
    k, out = A.shape[0], B.shape[0]
    a = A.reshape(groups, k // groups, -1)
    b = B.reshape(groups, out // groups, k // groups)
    delta = torch.bmm(b * p.reshape(groups, 1, -1), a)
    return delta.reshape(out, *A.shape[1:])


def _bias_delta(B, offset, groups):  # Δb = B · (p ⊙ a + q), per group for convs
    out = B.shape[0]
    b = B.reshape(groups, out // groups, -1)
    return torch.einsum("gok,gk->go", b, offset.reshape(groups, -1)).reshape(out)


FOLD_RULES = {
    "linear": lambda A, B, p, g: _fold_linear(A, B, p),
    "matmul_left": lambda A, B, p, g: _fold_linear(A, B, p),
    "matmul_right": lambda A, B, p, g: _fold_linear(A, B, p).T,   # x @ P: P = Wᵀ
    "conv": _fold_conv,
}


def branch_deltas(site: Site, branch) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(ΔW, Δb)`` in float64 for one branch at its current effective α (assumed on C)."""
    with torch.no_grad():
        p, q = (t.to(torch.float64).reshape(-1) for t in branch.affine_form())
        A = branch.A.detach().to(torch.float64)
        B = branch.B.detach().to(torch.float64).reshape(branch.B.shape[0], -1)
        delta_w = FOLD_RULES[site.kind](A, B, p, site.groups)
        offset = q.expand(branch.width).clone()
        if branch.a is not None:
            offset = offset + p * branch.a.detach().to(torch.float64)
        delta_b = _bias_delta(B, offset, site.groups) if not branch.zero_offset else None
    return delta_w, delta_b


def fold_extension(gm: fx.GraphModule, sites: list[Site], branches: dict) -> PassResult:
    """Compute folded weights for every branch and return a contracted copy of the graph.

    ``info`` maps each parameter's qualified name to its new value (float64), one entry per
    parameter even when a bias is shared. The returned graph module shares ``gm``'s submodules
    and parameters, with the branch and add nodes removed.
    """
    new_values: dict[str, torch.Tensor] = {}
    for site in sites:
        delta_w, delta_b = branch_deltas(site, branches[site.name])
        weight = gm.get_parameter(site.weight_name)
        new_values[site.weight_name] = weight.detach().to(torch.float64) + delta_w
        if delta_b is None:
            continue
        for bias_name in dict.fromkeys(u.bias_name for u in site.uses):
            bias = gm.get_parameter(bias_name)
            new_values[bias_name] = bias.detach().to(torch.float64) + delta_b

    def branch_input(node: fx.Node) -> fx.Node | None:  # x for the branch, z for z + branch
        return node.args[0] if node.meta.get(ROLE_META) is not None else None

    contracted = copy_graph_module(gm, replace=branch_input)
    return PassResult(contracted, modified=True, info=new_values)
