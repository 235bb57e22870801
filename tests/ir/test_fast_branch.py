"""The units-first branch layout (ir/kinds.py): same function and gradients as the textbook
``B·ρ(A x + a)``, E1 bit-exact, for every input layout a linear site meets."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import morphc
from morphc.ir.branch import BypassBranch


def _reference(branch: BypassBranch, x: torch.Tensor) -> torch.Tensor:
    """``B · ρ_α(A x + a)`` written the obvious way (units last)."""
    alpha = branch.effective_alpha()
    return F.linear(branch.compiled.rho(F.linear(x, branch.A, branch.a), alpha), branch.B)


def _branch(with_bias: bool, dtype=torch.float64) -> BypassBranch:
    branch = BypassBranch("linear", 6, 5, 3, "tanh", with_bias=with_bias,
                          homotopy=torch.tensor(0.7, dtype=dtype), dtype=dtype,
                          generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        branch.B.copy_(torch.randn(branch.B.shape, generator=torch.Generator().manual_seed(1)))
    return branch


INPUTS = {
    "2d": lambda: torch.randn(4, 6, dtype=torch.float64),
    "1d": lambda: torch.randn(6, dtype=torch.float64),
    "3d_transposed": lambda: torch.randn(2, 4, 6, dtype=torch.float64).transpose(0, 1),
    "empty_batch": lambda: torch.randn(0, 6, dtype=torch.float64),
}


@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("layout", sorted(INPUTS))
def test_units_first_matches_reference_values_and_gradients(layout, with_bias):
    branch = _branch(with_bias)
    x = INPUTS[layout]().requires_grad_()
    got, want = branch(x), _reference(branch, x)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    if got.numel() == 0:
        return
    g = torch.randn_like(got)
    params = [p for p in branch.parameters()]
    grads = torch.autograd.grad(got, [x, *params], g)
    ref = torch.autograd.grad(want, [x, *params], g)
    for a, b in zip(grads, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_gradient_layouts_leave_parameters_contiguous():
    """B's gradient comes out of a transposed product; what lands in .grad has B's layout."""
    branch = _branch(True, torch.float32)
    branch(torch.randn(7, 6)).sum().backward()
    assert all(p.grad.shape == p.shape for p in branch.parameters())


@pytest.mark.parametrize("name", ["mlp_negzero", "transformer"])
def test_e1_bit_exact_with_new_layout(name):
    """E1 with torch.equal, including -0.0 in a site's output (-0.0 + 0.0 is +0.0: equal)."""
    torch.manual_seed(0)
    if name == "mlp_negzero":
        model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        with torch.no_grad():
            model[2].weight.zero_()
            model[2].bias.fill_(-0.0)
        inputs = (torch.randn(5, 4),)
    else:
        model, inputs = morphc.zoo.transformer(d_model=16, heads=2, layers=1, batch=3, seq=5)
    with torch.no_grad():   # train mode: in eval, nn.MultiheadAttention's fused fast path
        #                     rounds differently from the export graph the branches live on
        before = model(*inputs)
        ext = morphc.extend(model, inputs, sites="all", width=4)
        after = ext(*inputs)
    assert torch.equal(before, after)
    assert not torch.isnan(after).any()


def test_a_branch_built_without_a_dtype_follows_the_default_dtype():
    branch = BypassBranch("linear", 4, 3, 2, "tanh", with_bias=True, homotopy=torch.ones(()))
    assert {p.dtype for p in branch.parameters()} == {torch.get_default_dtype()}
    x = torch.randn(5, 4)
    assert torch.equal(branch(x), torch.zeros(5, 3)), "B = 0: the branch adds nothing"


# -- ρ of a thin conv branch as rows of SIMD lanes (what torch.compile runs on a CPU) ----------


@pytest.mark.parametrize("family", ["tanh", "prelu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("k, shape", [(1, (2, 1, 4, 4)), (3, (2, 3, 4, 4)), (4, (3, 4, 5, 4)),
                                      (8, (2, 8, 6)), (12, (2, 12, 2, 2, 4))],
                         ids=["k1", "k3", "k4", "k8_conv1d", "k12_conv3d"])
def test_rho_by_rows_is_rho_element_for_element(k, shape, dtype, family):
    """Each unit keeps its own α when the map is cut into rows of lcm(k, 16) values."""
    from morphc.families import get_family
    from morphc.ir.branch import rho_by_rows

    compiled = get_family(family).compile()
    gen = torch.Generator().manual_seed(0)
    u = torch.randn(shape, generator=gen, dtype=dtype)
    alpha = torch.randn(len(get_family(family).init), k, generator=gen, dtype=dtype)
    want = compiled.rho(u, alpha.reshape(alpha.shape[0], k, *[1] * (u.dim() - 2)))
    assert torch.equal(rho_by_rows(compiled, u, alpha), want)


def test_compiled_conv_branch_uses_rows_and_matches_eager(monkeypatch):
    """Under torch.compile on a CPU a thin conv branch runs ρ on rows of lanes; the step's
    output and gradients are those of eager mode (to float rounding: B's conv sees another
    memory layout)."""
    import morphc.ir.branch as branch_module

    calls = []
    original = branch_module.rho_by_rows
    monkeypatch.setattr(branch_module, "rho_by_rows",
                        lambda *args: calls.append(1) or original(*args))
    torch.manual_seed(0)
    model, (x,) = morphc.zoo.cnn_bn(channels=8, batch=2, size=8)
    ext = morphc.extend(model, (x,), sites="all", width=4)
    with torch.no_grad():
        for branch in ext.branches.values():
            branch.B.normal_()
    params = [p for p in ext.parameters() if p.requires_grad]

    def run(module):
        out = module(x)
        return [out.detach(), *torch.autograd.grad(out.square().sum(), params)]

    torch._dynamo.reset()
    compiled = run(torch.compile(ext.graph_module, backend="eager"))
    assert calls, "the compiled conv branches did not take the rows path"
    calls.clear()
    eager = run(ext.graph_module)
    assert not calls, "eager mode keeps ρ on the map itself (E1 bit for bit)"
    for got, want in zip(compiled, eager, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
