"""The constraint compiler: every sympy-derived rule checked symbolically and numerically."""

import math

import pytest
import sympy as sp
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from morphc import families
from morphc.errors import FamilyError
from morphc.families import (
    available_families,
    derivation_count,
    get_family,
    register_activation,
)

BUILTINS = ("tanh", "poly", "prelu", "swish")

# name -> (solution, p, q) with parameters named as in the family; the table drives many tests.
EXPECTED = {
    "tanh": ({"alpha2": 0}, "alpha1", 0),
    "poly": ({"alpha2": 0}, "alpha1", "alpha0"),
    "prelu": ({"alpha": 1}, 1, 0),
    "swish": ({"alpha2": 0}, "alpha1", 0),
}

t_sym, a1, a2 = sp.symbols("t a1 a2")


@pytest.fixture
def scratch_names():
    """Names registered by a test are removed afterwards, so tests do not see each other's."""
    names: list[str] = []
    yield names
    for name in names:
        families._REGISTRY.pop(name, None)


def _sym(family, value):
    """An expected value written with parameter names, as a sympy expression of the family."""
    by_name = {str(a): a for a in family.params}
    return by_name[value] if isinstance(value, str) else sp.Integer(value)


def _alpha(family, k, dtype=torch.float64, scale=1.0, seed=0):
    """Random per-unit α around the family's init, shape (n_params, k)."""
    gen = torch.Generator().manual_seed(seed)
    init = torch.tensor(family.init, dtype=dtype)[:, None]
    return init + scale * torch.randn(family.n_params, k, generator=gen, dtype=dtype)


def _affine_misfit(rho_values, t):
    """Largest deviation of ρ(t) from its least-squares line (0 iff ρ is affine on the grid)."""
    design = torch.stack([t, torch.ones_like(t)], dim=1)
    coef = torch.linalg.lstsq(design, rho_values).solution
    return (design @ coef - rho_values).abs().max().item()


def test_builtins_are_registered():
    assert set(BUILTINS) <= set(available_families())


@pytest.mark.parametrize("name", BUILTINS)
def test_builtin_derivation_matches_expected(name):
    family = get_family(name)
    cf = family.compile()
    solution, p, q = EXPECTED[name]
    expected = {_sym(family, k): _sym(family, v) for k, v in solution.items()}
    assert cf.solution == expected
    assert sp.simplify(cf.p_expr - _sym(family, p)) == 0
    assert sp.simplify(cf.q_expr - _sym(family, q)) == 0
    assert cf.constraints == tuple(k - v for k, v in expected.items())
    # On C, ρ is exactly p·t + q, symbolically (Max/Min rewritten piecewise for prelu).
    on_c = family.expr.xreplace(cf.solution) - (cf.p_expr * family.t + cf.q_expr)
    real_t = sp.Symbol("t", real=True)
    assert sp.simplify(on_c.xreplace({family.t: real_t}).rewrite(sp.Piecewise)) == 0


@pytest.mark.parametrize("name", BUILTINS)
def test_builtin_is_affine_on_c_and_not_at_init(name):
    family = get_family(name)
    cf = family.compile()
    t = 3 * torch.randn(200, 1, dtype=torch.float64)  # both signs, for prelu's two pieces
    proj = cf.project(_alpha(family, 5))
    expected = cf.p(proj) * t + cf.q(proj)
    torch.testing.assert_close(cf.rho(t, proj), expected, rtol=0, atol=1e-12)
    # At init ρ is genuinely non-linear: no line fits it.
    grid = torch.linspace(-3, 3, 61, dtype=torch.float64)
    at_init = torch.tensor(family.init, dtype=torch.float64)[:, None]
    assert _affine_misfit(cf.rho(grid[:, None], at_init)[:, 0], grid) > 1e-2


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", BUILTINS)
def test_homotopy_reaches_c_exactly(name, dtype):
    family = get_family(name)
    cf = family.compile()
    alpha = _alpha(family, 7, dtype=dtype)
    proj = cf.project(alpha)
    at_zero = cf.homotopy(alpha, torch.tensor(0.0, dtype=dtype))
    assert torch.equal(at_zero, proj)
    assert cf.residual(at_zero).item() == 0.0
    assert cf.residual(alpha).item() > 0
    init = torch.tensor(family.init, dtype=dtype)[:, None].repeat(1, 3)
    assert cf.residual(init).item() > 0
    for i, a in enumerate(family.params):  # free parameters pass through bit-identically
        if a not in cf.solution:
            assert torch.equal(proj[i], alpha[i])
    torch.testing.assert_close(cf.homotopy(alpha, torch.tensor(1.0, dtype=dtype)), alpha)


def test_zero_offset_poly_forces_q_zero():
    family = get_family("poly")
    cf = family.compile(zero_offset=True)
    alpha0, _, alpha2 = family.params
    assert cf.solution == {alpha0: 0, alpha2: 0}
    assert cf.q_expr == 0 and cf.zero_offset
    assert family.compile().q_expr == alpha0  # the biased variant keeps its offset
    proj = cf.project(_alpha(family, 4, scale=2.0))
    t = torch.randn(50, 1, dtype=torch.float64)
    assert torch.equal(cf.q(proj), torch.zeros(4, dtype=torch.float64))
    torch.testing.assert_close(cf.rho(t, proj), cf.p(proj) * t, rtol=0, atol=1e-12)
    assert "no offset" in cf.describe()


@pytest.mark.parametrize("name", ["tanh", "prelu", "swish"])
def test_zero_offset_is_free_when_q_already_vanishes(name):
    family = get_family(name)
    assert family.compile(zero_offset=True).solution == family.compile().solution


def test_constant_expressions_give_full_tensors():
    cf = get_family("prelu").compile()
    alpha = torch.full((1, 3, 1, 1), 0.5, dtype=torch.float32)
    for out in (cf.p(alpha), cf.q(alpha)):
        assert isinstance(out, torch.Tensor)
        assert out.shape == (3, 1, 1) and out.dtype == torch.float32
    assert torch.equal(cf.p(alpha), torch.ones(3, 1, 1))
    assert torch.equal(cf.project(alpha), torch.ones(1, 3, 1, 1))
    assert cf.residual(alpha).shape == () and cf.residual(alpha).item() == 0.5


def test_describe_shows_rho_constraints_and_affine_form():
    text = get_family("prelu").compile().describe()
    assert "alpha - 1 = 0" in text and "p = 1" in text and "Max" in text


def test_user_family_end_to_end_and_cached(scratch_names):
    scratch_names.append("test_sine")
    before = derivation_count()
    family = register_activation("test_sine", a1 * t_sym + a2 * sp.sin(t_sym), (a1, a2), (1.0, 0.5))
    assert derivation_count() == before + 1  # derived at registration
    cf = family.compile()
    assert family.compile() is cf and get_family("test_sine").compile() is cf
    assert derivation_count() == before + 1  # ... and never again
    assert family.t == t_sym and cf.solution == {a2: 0}
    assert cf.p_expr == a1 and cf.q_expr == 0
    alpha = torch.tensor([[1.0, -2.0, 0.3], [0.5, 1.5, -1.0]], dtype=torch.float64)
    t = torch.randn(30, 3, dtype=torch.float64)
    torch.testing.assert_close(cf.rho(t, alpha), alpha[0] * t + alpha[1] * torch.sin(t))
    on_c = cf.homotopy(alpha, torch.tensor(0.0, dtype=torch.float64))
    assert cf.residual(on_c).item() == 0.0
    torch.testing.assert_close(cf.rho(t, on_c), cf.p(on_c) * t, rtol=0, atol=1e-12)
    family.compile(zero_offset=True)
    assert derivation_count() == before + 2  # the other variant is a separate derivation


# (expression builder, init, expected solution) for user piecewise forms.
PIECEWISE_FAMILIES = {
    "leaky": (lambda t, a, b: sp.Piecewise((t, t >= 0), (a * t, True)), (0.1,), "a=1"),
    "abs": (lambda t, a, b: a * t + b * sp.Abs(t), (1.0, 1.0), "b=0"),
    "step": (lambda t, a, b: a * t + b * sp.Heaviside(t), (1.0, 1.0), "b=0"),
}


@pytest.mark.parametrize("kind", sorted(PIECEWISE_FAMILIES))
def test_user_piecewise_families(kind, scratch_names):
    build, init, solved = PIECEWISE_FAMILIES[kind]
    a, b = sp.symbols("a b")
    expr = build(t_sym, a, b)
    params = tuple(s for s in (a, b) if s in expr.free_symbols)
    scratch_names.append(f"test_{kind}")
    family = register_activation(f"test_{kind}", expr, params, init)
    cf = family.compile()
    key, value = solved.split("=")
    assert cf.solution == {sp.Symbol(key): int(value)}
    alpha = _alpha(family, 4)
    t = torch.linspace(-2, 2, 41, dtype=torch.float64)[:, None]  # includes t = 0 exactly
    proj = cf.project(alpha)
    torch.testing.assert_close(cf.rho(t, proj), cf.p(proj) * t + cf.q(proj), rtol=0, atol=1e-12)
    assert _affine_misfit(cf.rho(t, alpha)[:, 0], t[:, 0]) > 1e-2


@pytest.mark.parametrize("expr, params, init, error, match", [
    ("a1*t + a2*tanh(t)", (a1, a2), (1.0, 1.0), TypeError, "sympy.Symbol"),
    (a1 * t_sym + a2 * sp.tanh(sp.Symbol("c") * t_sym), (a1, a2), (1.0, 1.0), FamilyError,
     "several candidate input symbols"),
    (t_sym**2 + a1 * t_sym**3, (a1,), (1.0,), FamilyError, "no α makes ρ affine"),
    (sp.tanh(t_sym), (), (), FamilyError, "no parameters"),
    (a1 * t_sym + a2, (a1, a2), (1.0, 1.0), FamilyError, "affine in t for every α"),
    (a1 * t_sym + a2 * sp.sin(t_sym), (a1, a2), (1.0, 0.0), FamilyError, "lies on C"),
    (a1 * t_sym + a2 * sp.acosh(t_sym + 2), (a1, a2), (1.0, 1.0), FamilyError,
     "no torch translation"),
    (a1 * t_sym + a2 * sp.sin(t_sym), (a1, "a2"), (1.0, 1.0), TypeError, "string"),
])
def test_rejections_say_why(expr, params, init, error, match):
    with pytest.raises(error, match=match) as info:
        register_activation("test_rejected", expr, params, init)
    assert isinstance(info.value, FamilyError)
    assert "test_rejected" not in available_families()


def test_registry_errors(scratch_names):
    with pytest.raises(FamilyError, match="known: .*prelu"):
        get_family("nope")
    with pytest.raises(FamilyError, match="overwrite=True"):
        register_activation("tanh", a1 * t_sym + a2 * sp.sin(t_sym), (a1, a2), (1.0, 1.0))
    scratch_names.append("test_twice")
    first = register_activation("test_twice", a1 * t_sym + a2 * sp.sin(t_sym), (a1, a2), (1, 1))
    second = register_activation("test_twice", a1 * t_sym + a2 * sp.cos(t_sym), (a1, a2), (1, 1),
                                 overwrite=True)
    assert get_family("test_twice") is second is not first


@pytest.fixture(scope="module")
def compiled_builtins():
    return {name: get_family(name).compile() for name in BUILTINS}


@settings(max_examples=40, deadline=None)
@given(name=st.sampled_from(BUILTINS), k=st.integers(1, 4), conv=st.booleans(),
       double=st.booleans(), seed=st.integers(0, 2**16), s=st.floats(0.0, 1.0))
def test_rho_broadcasts_and_has_finite_gradients(compiled_builtins, name, k, conv, double, seed,
                                                 s):
    cf = compiled_builtins[name]
    dtype = torch.float64 if double else torch.float32
    unit_shape = (k, 1, 1) if conv else (k,)
    t_shape = (2, k, 3, 3) if conv else (5, k)
    gen = torch.Generator().manual_seed(seed)
    alpha = (_alpha(cf.family, k, dtype=dtype, seed=seed).reshape(-1, *unit_shape)
             .requires_grad_())
    t = (3 * torch.randn(t_shape, generator=gen, dtype=dtype)).requires_grad_()
    effective = cf.homotopy(alpha, torch.tensor(s, dtype=dtype))
    out = cf.rho(t, effective)
    assert out.shape == t_shape and out.dtype == dtype
    assert cf.p(effective).shape == unit_shape and cf.q(effective).dtype == dtype
    (out.sum() + cf.residual(effective)).backward()
    assert torch.isfinite(t.grad).all() and torch.isfinite(alpha.grad).all()
    assert t.grad.shape == t_shape and alpha.grad.shape == alpha.shape


def _rho_pipeline(cf):
    def run(t, alpha, s):
        effective = cf.homotopy(alpha, s)
        return cf.rho(t, effective), cf.p(effective), cf.q(effective), cf.residual(effective)
    return run


@pytest.mark.parametrize("name", ["prelu", "swish"])
def test_traces_without_graph_breaks(name):
    """fullgraph=True fails on any Python branch on tensor values (cheap: eager backend)."""
    cf = get_family(name).compile()
    run = _rho_pipeline(cf)
    compiled = torch.compile(run, backend="eager", fullgraph=True)
    args = (torch.randn(4, 3, 5, 5), _alpha(cf.family, 3, torch.float32)[..., None, None],
            torch.tensor(0.5))
    for got, want in zip(compiled(*args), run(*args), strict=True):
        assert torch.equal(got, want)


@pytest.mark.slow
def test_rho_under_inductor_matches_eager():
    cf = get_family("prelu").compile()
    run = _rho_pipeline(cf)
    compiled = torch.compile(run, fullgraph=True)
    args = (torch.randn(4, 3, 5, 5), _alpha(cf.family, 3, torch.float32)[..., None, None],
            torch.tensor(0.0))
    for got, want in zip(compiled(*args), run(*args), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert math.isclose(compiled(*args)[3].item(), 0.0, abs_tol=0.0)
