"""One strategy object per site kind: everything that differs between a linear map, a convolution
and a matmul against a parameter, in one place.

A kind knows the shapes of its branch operators, how to apply them (``A x + a`` with the site's
own operator, then the 1×1 ``B``), how a branch folds into the site's weight on C, and what a use
costs. The branch module, the fold pass and ``inspect`` ask the kind; none of them switches on
the kind's name.

Fold rules (on C, ρ(t) = p·t + q per unit)::

    linear          ΔW = B · diag(p) · A                      # z = x Wᵀ + b
    matmul_left     ΔW = B · diag(p) · A                      # z = W x
    matmul_right    ΔP = (B · diag(p) · A)ᵀ                   # z = x P, P = Wᵀ
    conv            ΔW_g = B_g · diag(p_g) · A_g per group     # A a kernel stack, B 1×1
    conv_transpose  ΔW_g[i,o] = Σ_j A_g[i,j] p_j B_g[o,j]      # W (in, out/groups, k...)
    all             Δb = B · (p ⊙ a + q)   (per group for convs)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from morphc.ir.sites import ConvConfig, Site

Tensor = torch.Tensor
_CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T_FN = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


class SiteKind:
    """Linear maps ``in → out`` along the last dimension (``nn.Linear``, ``F.linear``)."""

    name = "linear"

    def a_shape(self, width: int, in_features: int, conv: ConvConfig | None) -> tuple[int, ...]:
        return (width, in_features)

    def b_shape(self, out_features: int, width: int, conv: ConvConfig | None) -> tuple[int, ...]:
        return (out_features, width)

    def unit_shape(self, width: int, conv: ConvConfig | None) -> tuple[int, ...]:
        """Shape under which per-unit α broadcasts against the pre-activation ``A x + a`` in
        this kind's layout (units first for linear maps: ``(k, positions)``)."""
        return (width, 1)

    def pre_activation(self, x: Tensor, A: Tensor, a: Tensor | None,
                       conv: ConvConfig | None) -> Tensor:
        """``(A x + a)ᵀ``, units first: ``(k, positions)``.

        Units first because a GEMM whose output has a short last dimension (k) is slow (MKL,
        one thread: ``gᵀ h`` with output ``(out, 8)`` takes 8× the time of ``hᵀ g``, output
        ``(8, out)``), and autograd picks the transposed product for a column-major operand:
        with ``(k, positions)`` here and ``Bᵀ`` row-major in :meth:`apply_b`, every product of
        the branch's forward and backward has a long last dimension."""
        rows = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])   # no view node when 2-D
        return torch.mm(A, rows.t()) if a is None else torch.addmm(a[:, None], A, rows.t())

    def apply_b(self, h: Tensor, B: Tensor, conv: ConvConfig | None, x: Tensor) -> Tensor:
        """``B h`` from the units-first ``h`` of :meth:`pre_activation`, shaped like the site's
        output for the input ``x``."""
        out = torch.mm(h.t(), B.t().contiguous())     # Bᵀ row-major: ∂B is computed as h·g
        return out if x.dim() == 2 else out.reshape(*x.shape[:-1], B.shape[0])

    def fold(self, A: Tensor, B: Tensor, p: Tensor, groups: int) -> Tensor:
        """ΔW in the layout of the site's weight (B flattened to ``(out, k/groups)``)."""
        return (B * p) @ A                      # ΔW[o,i] = Σ_k B[o,k] p[k] A[k,i]

    def macs(self, in_features: int, out_features: int, conv: ConvConfig | None,
             output_shape: tuple[int, ...]) -> int:
        """Multiply-accumulates of one use, from its output shape."""
        return math.prod(output_shape[:-1]) * in_features * out_features

    def branch_macs(self, in_features: int, out_features: int, width: int,
                    conv: ConvConfig | None, output_shape: tuple[int, ...]) -> int:
        """What a width-``k`` branch adds at one use: ``A`` (k units of the site's operator)
        plus ``B`` (a 1×1 ``k → out``); ρ's elementwise work is not counted."""
        site = self.macs(in_features, out_features, conv, output_shape)
        groups = conv.groups if conv else 1
        kernel = math.prod(conv.kernel_size) if conv else 1
        return site * width // out_features + \
            site // (in_features // groups) // max(kernel, 1) * width // groups


class MatmulLeft(SiteKind):
    """``W @ x``: units along dimension −2 of the output."""

    name = "matmul_left"

    def unit_shape(self, width, conv):
        return (width, 1)

    def pre_activation(self, x, A, a, conv):
        u = A @ x
        return u if a is None else u + a[:, None]

    def apply_b(self, h, B, conv, x):
        return B @ h

    def macs(self, in_features, out_features, conv, output_shape):
        positions = math.prod(output_shape) // max(output_shape[-2], 1)
        return positions * in_features * out_features


class MatmulRight(SiteKind):
    """``x @ P`` with ``P = Wᵀ`` a parameter: a linear map whose weight is stored transposed."""

    name = "matmul_right"

    def fold(self, A, B, p, groups):
        return super().fold(A, B, p, groups).T


class Conv(SiteKind):
    """``convNd`` with any stride, padding (mode), dilation and groups; ``A`` copies them, ``B`` is
    a grouped 1×1 conv."""

    name = "conv"

    def a_shape(self, width, in_features, conv):
        return (width, in_features // conv.groups, *conv.kernel_size)

    def b_shape(self, out_features, width, conv):
        return (out_features, width // conv.groups, *([1] * conv.dim))

    def unit_shape(self, width, conv):
        return (width, *([1] * conv.dim))

    def pre_activation(self, x, A, a, conv):
        padding = conv.padding
        if conv.padding_mode != "zeros":
            x = F.pad(x, _reversed_padding(conv), mode=conv.padding_mode)
            padding = 0
        return _CONV_FN[conv.dim](x, A, a, conv.stride, padding, conv.dilation, conv.groups)

    def apply_b(self, h, B, conv, x):
        return _CONV_FN[conv.dim](h, B, None, 1, 0, 1, conv.groups)

    def fold(self, A, B, p, groups):
        k, out = A.shape[0], B.shape[0]
        a = A.reshape(groups, k // groups, -1)
        b = B.reshape(groups, out // groups, k // groups)
        delta = torch.bmm(b * p.reshape(groups, 1, -1), a)
        return delta.reshape(out, *A.shape[1:])

    def macs(self, in_features, out_features, conv, output_shape):
        return math.prod(output_shape) * (in_features // conv.groups) * \
            math.prod(conv.kernel_size)


class ConvTranspose(Conv):
    """``conv_transposeNd`` (weight ``(in, out/groups, k...)``): ``A`` is a transposed conv with
    the site's stride, padding, output padding, dilation and groups and ``k/groups`` outputs per
    group, so its output grid is the site's; ``B`` a grouped 1×1 conv on that grid. The fold is
    exact: a 1×1 conv after a transposed conv composes into one transposed conv."""

    name = "conv_transpose"

    def a_shape(self, width, in_features, conv):
        return (in_features, width // conv.groups, *conv.kernel_size)

    def pre_activation(self, x, A, a, conv):
        return _CONV_T_FN[conv.dim](x, A, a, conv.stride, conv.padding,
                                    conv.output_padding or 0, conv.groups, conv.dilation)

    def fold(self, A, B, p, groups):
        in_f, k_g = A.shape[0], A.shape[1]
        out = B.shape[0]
        a = A.reshape(groups, in_f // groups, k_g, -1)             # g, i, j, kernel
        b = B.reshape(groups, out // groups, k_g) * p.reshape(groups, 1, k_g)
        delta = torch.einsum("gijk,goj->giok", a, b)
        return delta.reshape(in_f, out // groups, *A.shape[2:])

    def macs(self, in_features, out_features, conv, output_shape):
        positions = math.prod(output_shape) // max(output_shape[1], 1) // \
            max(math.prod(conv.stride), 1)
        return positions * in_features * (out_features // conv.groups) * \
            math.prod(conv.kernel_size)


def _reversed_padding(conv: ConvConfig) -> tuple[int, ...]:
    """``F.pad`` order (last dim first) for a conv's padding, as ``nn.ConvNd`` computes it for a
    ``padding_mode`` other than zeros: ``"same"`` pads ``dilation·(k − 1)`` in all, the odd one
    on the right; ``"valid"`` pads nothing."""
    out: list[int] = []
    for i in reversed(range(conv.dim)):
        if conv.padding == "same":
            total = conv.dilation[i] * (conv.kernel_size[i] - 1)
            out += [total // 2, total - total // 2]
        else:
            out += [0, 0] if conv.padding == "valid" else [conv.padding[i]] * 2
    return tuple(out)


def bias_delta(B: Tensor, offset: Tensor, groups: int) -> Tensor:
    """Δb = B · (p ⊙ a + q), per group for convs (every kind stores B as ``(out, k/groups, …)``)."""
    out = B.shape[0]
    b = B.reshape(groups, out // groups, -1)
    return torch.einsum("gok,gk->go", b, offset.reshape(groups, -1)).reshape(out)


KINDS: dict[str, SiteKind] = {k.name: k for k in (SiteKind(), Conv(), ConvTranspose(),
                                                    MatmulLeft(), MatmulRight())}


def kind_of(name: str) -> SiteKind:
    if name not in KINDS:
        raise ValueError(f"unknown site kind {name!r}; known: {sorted(KINDS)}")
    return KINDS[name]


def site_macs(site: Site, output_shape) -> int:
    """Multiply-accumulates of one use of a site, from its output shape (0 when unknown)."""
    if output_shape is None:
        return 0
    return kind_of(site.kind).macs(site.in_features, site.out_features, site.conv, output_shape)


def branch_macs(site: Site, width: int, output_shape) -> int:
    """Multiply-accumulates a width-``k`` branch adds at one use (ρ's elementwise work aside)."""
    if output_shape is None:
        return 0
    return kind_of(site.kind).branch_macs(site.in_features, site.out_features, width, site.conv,
                                          output_shape)
