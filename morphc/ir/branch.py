"""The bypass branch ``B · ρ_α(A x + a)`` as an ``nn.Module`` the extension pass inserts.

``A`` is the same kind of operator as the site (a conv with the site's kernel, stride, padding,
dilation and groups; or a linear map), ``B`` is a 1×1 (grouped) operator initialised to zero, so
inserting the branch changes nothing (E1). ``α`` is per unit; the effective parameters are the
homotopy ``α_C + s·(α − α_C)`` with ``s`` a tensor shared by all branches of one extended model, so
changing ``s`` never recompiles a compiled graph.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from morphc.families import get_family
from morphc.ir.kinds import kind_of
from morphc.ir.sites import ConvConfig

LANES = 16   # float32 values per AVX-512 register, a multiple of AVX2's 8


class BypassBranch(nn.Module):
    """One bypass branch; ``kind`` names its :class:`~morphc.ir.kinds.SiteKind` (``linear``,
    ``conv``, ``matmul_right``, ``matmul_left``), which knows the operators' shapes and how to
    apply them."""

    def __init__(self, kind: str, in_features: int, out_features: int, width: int,
                 family: str, *, with_bias: bool, homotopy: torch.Tensor,
                 conv: ConvConfig | None = None, dtype=None, device=None,
                 generator: torch.Generator | None = None, init_scale: float = 1.0) -> None:
        super().__init__()
        self.kind, self.width, self.family_name = kind, width, family
        self.strategy = kind_of(kind)
        self.in_features, self.out_features = in_features, out_features
        self.conv = conv
        self.zero_offset = not with_bias
        self.compiled = get_family(family).compile(zero_offset=self.zero_offset)
        a_shape = self.strategy.a_shape(width, in_features, conv)
        b_shape = self.strategy.b_shape(out_features, width, conv)
        fan_in = math.prod(a_shape[1:])
        dtype = dtype if dtype is not None else torch.get_default_dtype()   # α too, not float64
        factory = dict(dtype=dtype, device=device)
        init_dtype = dtype if dtype in (torch.float32, torch.float64) else torch.float32
        a_init = torch.randn(a_shape, generator=generator, dtype=init_dtype)
        self.A = nn.Parameter((a_init * (init_scale / math.sqrt(fan_in))).to(**factory))
        if with_bias:
            a_bias = torch.randn(width, generator=generator, dtype=init_dtype) * 0.1
            self.a = nn.Parameter(a_bias.to(**factory))
        else:
            self.register_parameter("a", None)
        self.B = nn.Parameter(torch.zeros(b_shape, **factory))
        init = torch.tensor(get_family(family).init, dtype=torch.float64)
        self.alpha = nn.Parameter(init[:, None].repeat(1, width).to(**factory))
        self.register_buffer("homotopy", homotopy, persistent=False)
        self._unit_shape = (-1, *self.strategy.unit_shape(width, conv))   # α's view for ρ

    def __getstate__(self) -> dict:
        """Pickle without the compiled family (closures made from sympy, which pickle cannot
        take); it is compiled again, from the registered family, on load."""
        state = dict(self.__dict__)
        state.pop("compiled", None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.compiled = get_family(self.family_name).compile(zero_offset=self.zero_offset)

    # -- the forward the graph calls ------------------------------------------------------------
    def unit_shape(self) -> tuple[int, ...]:
        """Shape under which per-unit α broadcasts against the pre-activation ``A x + a``."""
        return self.strategy.unit_shape(self.width, self.conv)

    def effective_alpha(self) -> torch.Tensor:
        """α on the homotopy path: ``α_C`` exactly at ``s = 0``, the free α at ``s = 1``."""
        alpha, s = self.alpha, self.homotopy
        return self.compiled.homotopy(alpha, s if s.dtype == alpha.dtype else s.to(alpha.dtype))

    def pre_activation(self, x: torch.Tensor) -> torch.Tensor:
        return self.strategy.pre_activation(x, self.A, self.a, self.conv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        alpha, u = self.effective_alpha(), self.pre_activation(x)
        if _rows_of_lanes(u, self.conv):
            h = rho_by_rows(self.compiled, u, alpha)
        else:
            h = self.compiled.rho(u, alpha.reshape(self._unit_shape))
        return self.strategy.apply_b(h, self.B, self.conv, x)

    # -- what the constraint compiler says about the current state ------------------------------
    def affine_form(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(p, q)`` per unit at the effective α — the branch's slope and offset on C."""
        alpha = self.effective_alpha()
        return self.compiled.p(alpha), self.compiled.q(alpha)

    def constraint_residual(self) -> torch.Tensor:
        return self.compiled.residual(self.effective_alpha())

    def extra_repr(self) -> str:
        return (f"kind={self.kind}, in={self.in_features}, out={self.out_features}, "
                f"width={self.width}, family={self.family_name!r}, zero_offset={self.zero_offset}")


# -- ρ of a thin conv branch, as torch.compile vectorises it on a CPU -----------------------------
def _rows_of_lanes(u: torch.Tensor, conv: ConvConfig | None) -> bool:
    """Whether ρ should run on :func:`rho_by_rows`' view: under torch.compile on a CPU, for a
    batched conv output whose k units do not fill whole SIMD registers and whose spatial size is
    static. Inductor stores conv maps channels-last and vectorises ρ along the innermost
    dimension, which is then k: k of 16 lanes, through masked loads (measured in the compiled
    CNN + BN step: ρ on a 32×4×32×32 map 0.86 ms, as rows of 16 values 0.21 ms; its backward
    0.61 → 0.25 ms)."""
    if conv is None or u.dim() != conv.dim + 2 or u.device.type != "cpu" or \
            not torch.compiler.is_compiling():
        return False
    k, spatial = u.shape[1], u.shape[2:]
    if not isinstance(k, int) or k % LANES == 0 or \
            not all(isinstance(d, int) for d in spatial):
        return False
    return math.prod(spatial) % (math.lcm(k, LANES) // k) == 0


def rho_by_rows(compiled, u: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """ρ(u; α) for a conv map ``u`` (batch, k units, spatial…), computed on the units-last order
    of ``u`` cut into rows of ``lcm(k, 16)`` values, each row holding whole groups of k units
    (column j is unit j mod k, so α is tiled along the row). The same numbers as ρ on ``u``
    itself, element for element; the caller checks that the spatial size divides into rows."""
    k = u.shape[1]
    lanes = math.lcm(k, LANES)
    rows = u.movedim(1, -1).reshape(-1, lanes)
    h = compiled.rho(rows, alpha.repeat(1, lanes // k))
    return h.reshape(u.shape[0], *u.shape[2:], k).movedim(-1, 1)
