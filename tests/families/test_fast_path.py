"""The eager fast path of a compiled family (α_C as one select when it is constant, ρ without a
broadcast-shape computation when t already has the result's shape) computes the same bits as the
generic path — values and gradients — for every built-in family and user-registered ones.

The generic path is what runs under torch.compile; the tests reach it by making
``torch.compiler.is_compiling()`` answer True for one computation, so they compare the two paths
of the same code and family object.
"""

from __future__ import annotations

import dataclasses

import pytest
import sympy as sp
import torch

from morphc import families
from morphc.families import available_families, get_family, register_activation
from morphc.ir.branch import BypassBranch

BUILTINS = ("tanh", "poly", "prelu", "swish")
S_VALUES = (0.0, 0.3, 0.7, 1.0)
DTYPES = (torch.float32, torch.float64)
t_sym, a1, a2 = sp.symbols("t a1 a2")
# name -> (expr, params, init): a constant α_C (fast path), a Piecewise one and one whose α_C
# depends on a free parameter (always the generic path).
USER = {
    "fp_sine": (a1 * t_sym + a2 * sp.sin(t_sym), (a1, a2), (1.0, 0.5)),
    "fp_leaky": (sp.Piecewise((t_sym, t_sym >= 0), (a1 * t_sym, True)), (a1,), (0.1,)),
    "fp_tied": (a1 * t_sym + (a2 - a1) * t_sym**2, (a1, a2), (1.0, 0.5)),
}


@pytest.fixture(scope="module")
def user_families():
    made = [register_activation(name, *spec, overwrite=True) for name, spec in USER.items()]
    yield [f.name for f in made]
    for name in USER:
        families._REGISTRY.pop(name, None)


def _generic(monkeypatch, fn, *args):
    """``fn(*args)`` with the fast paths off (they are skipped under torch.compile)."""
    with monkeypatch.context() as patch:
        patch.setattr(torch.compiler, "is_compiling", lambda: True)
        return fn(*args)


def _bits(x: torch.Tensor) -> torch.Tensor:
    """The raw bits (torch.equal says -0.0 == 0.0; these do not)."""
    x = x.detach().contiguous()
    return x.view({torch.float32: torch.int32, torch.float64: torch.int64}[x.dtype])


def _assert_same_bits(fast, generic):
    assert len(fast) == len(generic)
    for a, b in zip(fast, generic, strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype
        assert torch.equal(_bits(a), _bits(b))


def _alpha(family, k, dtype, seed):
    """α around the init, with awkward values: -0.0, the constants of C, a large one."""
    gen = torch.Generator().manual_seed(seed)
    alpha = torch.tensor(family.init, dtype=dtype)[:, None] + \
        torch.randn(family.n_params, k, generator=gen, dtype=dtype)
    alpha[:, 0] = -0.0
    alpha[:, 1] = 1.0
    alpha[:, 2] = 0.0
    alpha[-1, 3] = 1e20
    return alpha


def _run(compiled, alpha, t, s, grad_out):
    """Everything the runtime asks of a family at one homotopy value, and the gradients."""
    alpha = alpha.clone().requires_grad_()
    t = t.clone().requires_grad_()
    eff = compiled.homotopy(alpha, s)
    out = compiled.rho(t, eff.reshape(alpha.shape[0], -1, 1))
    grads = torch.autograd.grad(out, [alpha, t], grad_out)
    with torch.no_grad():
        extra = [compiled.project(alpha), compiled.p(eff), compiled.q(eff),
                 compiled.residual(eff)]
    return [eff, out, *grads, *extra]


@pytest.mark.parametrize("zero_offset", [False, True], ids=["bias", "no_bias"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_fast_path_matches_generic_bit_for_bit(user_families, monkeypatch, dtype, zero_offset):
    names = [*BUILTINS, *user_families]
    assert set(BUILTINS) <= set(available_families())
    for name in names:
        family = get_family(name)
        try:
            compiled = family.compile(zero_offset)
        except families.FamilyError:      # no q = 0 solution for this family
            continue
        k, positions = 6, 5
        alpha = _alpha(family, k, dtype, seed=len(name))
        gen = torch.Generator().manual_seed(7)
        t = torch.randn(k, positions, generator=gen, dtype=dtype) * 3
        t[0, 0], t[1, 1] = -0.0, 0.0
        grad_out = torch.randn(k, positions, generator=gen, dtype=dtype)
        for value in S_VALUES:
            s = torch.tensor(value, dtype=dtype)
            fast = _run(compiled, alpha, t, s, grad_out)
            generic = _generic(monkeypatch, _run, compiled, alpha, t, s, grad_out)
            _assert_same_bits(fast, generic)


def test_fast_path_is_taken_exactly_when_alpha_c_is_constant(user_families):
    assert all(get_family(n).compile()._fixed is not None
               for n in (*BUILTINS, "fp_sine", "fp_leaky"))
    assert get_family("fp_tied").compile()._fixed is None
    # the constants are the projection's own numbers
    assert get_family("prelu").compile()._fixed == (1,)
    assert get_family("tanh").compile()._fixed == (None, 0)


def test_fixed_constants_are_made_once_per_dtype_and_device():
    compiled = dataclasses.replace(get_family("prelu").compile(), _fixed_tensors={})
    alpha = torch.randn(1, 4)
    compiled.homotopy(alpha, torch.tensor(0.5))
    compiled.homotopy(alpha * 2, torch.tensor(0.5))
    compiled.homotopy(alpha.double(), torch.tensor(0.5, dtype=torch.float64))
    assert len(compiled._fixed_tensors) == 2
    with torch.inference_mode():     # made there, the constants must still serve autograd
        compiled2 = dataclasses.replace(compiled, _fixed_tensors={})
        compiled2.homotopy(alpha, torch.tensor(0.5))
    leaf = alpha.clone().requires_grad_()
    compiled2.homotopy(leaf, torch.tensor(0.5)).sum().backward()
    assert leaf.grad is not None


@pytest.mark.parametrize("layout", ["2d", "3d"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("name", [*BUILTINS, "fp_sine", "fp_leaky", "fp_tied"])
def test_branch_forward_and_accumulated_gradients_match_generic(user_families, monkeypatch,
                                                                name, dtype, layout):
    """A branch as the runtime uses it: a joint step (s = 0, then s = 1, gradients summed into
    .grad), then a return step at s in between, against the generic path."""

    def make():
        branch = BypassBranch("linear", 5, 4, 3, name, with_bias=True,
                              homotopy=torch.tensor(1.0, dtype=dtype), dtype=dtype,
                              generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            branch.B.copy_(torch.randn(branch.B.shape, dtype=dtype,
                                       generator=torch.Generator().manual_seed(1)))
        return branch

    gen = torch.Generator().manual_seed(2)
    shape = (6, 5) if layout == "2d" else (2, 3, 5)
    x = torch.randn(shape, generator=gen, dtype=dtype)

    def run(branch):
        outs = []
        for values in ((0.0, 1.0), (0.4,)):
            for p in branch.parameters():
                p.grad = None
            for value in values:
                branch.homotopy.fill_(value)
                out = branch(x)
                out.square().sum().backward()
                outs.append(out)
            outs += [p.grad for p in branch.parameters()]
        return outs

    _assert_same_bits(run(make()), _generic(monkeypatch, lambda: run(make())))
