"""einsum / bmm / baddbmm against a parameter: sites of the existing kinds, or explained exclusions.

E1 bit for bit after extend, C1 (rel. dev. ≤ 1e-6 in float32) after a few optimizer steps on the
branches then contraction, in eager (symbolic_trace) and through the export frontend; sites +
exclusions cover every linear-operator weight; save/load of a grown einsum architecture.
"""

import pytest
import torch
import torch.nn.functional as F
from morphc.passes.find_sites import find_sites
from morphc.passes.infra import Pipeline
from torch import nn

import morphc
from morphc.compiler.deviation import relative_deviation
from morphc.ir.einsum_map import EinsumMap, einsum_map
from tests.ir.test_sites import linear_operator_weights


class Einsum(nn.Module):
    """``einsum(equation, x, W)`` (or ``W, x`` when ``weight_first``), optional ``W.t()``."""

    LINEAR_WEIGHTS = ("w",)

    def __init__(self, equation, shape, weight_first=False, transpose=False):
        super().__init__()
        self.equation, self.weight_first, self.transpose = equation, weight_first, transpose
        self.w = nn.Parameter(torch.randn(*shape) / shape[-1] ** 0.5)

    def forward(self, x):
        w = self.w.t() if self.transpose else self.w
        operands = (w, x) if self.weight_first else (x, w)
        return torch.einsum(self.equation, *operands)


class Batched(nn.Module):
    """``baddbmm(b, x, W.expand(G, -1, -1))``, ``bmm(W[None].expand(...), x)`` or ``bmm`` with a
    3-D parameter (G separate maps)."""

    LINEAR_WEIGHTS = ("w",)

    def __init__(self, how, shape):
        super().__init__()
        self.how = how
        self.w = nn.Parameter(torch.randn(*shape) / shape[-1] ** 0.5)
        self.b = nn.Parameter(torch.randn(shape[-1]) * 0.1)

    def forward(self, x):
        if self.how == "baddbmm":
            return torch.baddbmm(self.b, x, self.w.expand(x.shape[0], -1, -1))
        if self.how == "bmm_left":
            return torch.bmm(self.w.unsqueeze(0).expand(x.shape[0], -1, -1), x)
        return torch.bmm(x, self.w)


class Attention(nn.Module):
    """A head written with einsum: projections are sites, ``q kᵀ`` is not a weight at all."""

    LINEAR_WEIGHTS = ("wq", "wk", "wo")

    def __init__(self, d=8):
        super().__init__()
        self.wq, self.wk = (nn.Parameter(torch.randn(d, d) / d ** 0.5) for _ in range(2))
        self.wo = nn.Parameter(torch.randn(d, d) / d ** 0.5)

    def forward(self, x):
        q = torch.einsum("bsd,ed->bse", x, self.wq)
        k = torch.einsum("bsd,de->bse", x, self.wk)
        att = torch.einsum("bqe,bke->bqk", q, k).softmax(-1)
        return torch.einsum("bqk,bke->bqe", att, x) @ self.wo


SITES = {   # name: (module factory, input shape, expected kind)
    "bsd,df->bsf": (lambda: Einsum("bsd,df->bsf", (6, 5)), (4, 3, 6), "matmul_right"),
    "bsd,fd->bsf": (lambda: Einsum("bsd,fd->bsf", (5, 6)), (4, 3, 6), "linear"),
    "...i,oi->...o": (lambda: Einsum("...i,oi->...o", (5, 6)), (4, 2, 3, 6), "linear"),
    "bij,jk->bik": (lambda: Einsum("bij,jk->bik", (6, 5)), (4, 3, 6), "matmul_right"),
    "df,bsd->bsf": (lambda: Einsum("df,bsd->bsf", (6, 5), weight_first=True), (4, 3, 6),
                    "matmul_right"),
    "oi,bin->bon": (lambda: Einsum("oi,bin->bon", (5, 6), weight_first=True), (4, 6, 3),
                    "matmul_left"),
    "bsd,fd->bsf (W.t())": (lambda: Einsum("bsd,df->bsf", (5, 6), transpose=True), (4, 3, 6),
                            "linear"),
    "implicit bi,io": (lambda: Einsum("bi,io", (6, 5)), (4, 6), "matmul_right"),
    "baddbmm expand": (lambda: Batched("baddbmm", (6, 5)), (4, 3, 6), "matmul_right"),
    "bmm left expand": (lambda: Batched("bmm_left", (5, 6)), (4, 6, 3), "matmul_left"),
}

EXCLUDED = {   # name: (module factory, input shape, words the reason must contain)
    "bsd,df->bfs": (lambda: Einsum("bsd,df->bfs", (6, 5)), (4, 3, 6), "output order"),
    "bsd,df->bf": (lambda: Einsum("bsd,df->bf", (6, 5)), (4, 3, 6), "sums over an axis"),
    "3-D einsum": (lambda: Einsum("bsd,hdf->bhsf", (2, 6, 5)), (4, 3, 6), "3-D parameter"),
    "bmm 3-D": (lambda: Batched("bmm3", (4, 6, 5)), (4, 3, 6), "G separate linear maps"),
}


def _table(model, x, frontend):
    return Pipeline(morphc.trace(model, (x,), frontend=frontend).graph_module) \
        .run(find_sites).analysis


@pytest.mark.parametrize("frontend", ["auto", "export"])
@pytest.mark.parametrize("name", list(SITES))
def test_einsum_and_batched_sites_are_exact(name, frontend):
    make, shape, kind = SITES[name]
    torch.manual_seed(0)
    model, x = make(), torch.randn(*shape)
    ext = morphc.extend(model, (x,), sites="all", width=4, frontend=frontend)
    assert [s.kind for s in ext.sites] == [kind]
    assert ext.traced.frontend == ("symbolic_trace" if frontend == "auto" else "export")
    with torch.no_grad():
        reference = model(x)
        assert torch.equal(ext(x), reference)                                           # E1
    optimizer = torch.optim.Adam(ext.extension_parameters(), lr=0.05)
    target = torch.randn_like(reference)
    for _ in range(5):
        optimizer.zero_grad()
        F.mse_loss(ext(x), target).backward()
        optimizer.step()
    ext.set_homotopy(0.0)
    with torch.no_grad():
        expected = ext(x)
    assert relative_deviation(reference, expected) > 1e-4          # the branches do something
    assert morphc.contract(ext) is model
    with torch.no_grad():
        assert relative_deviation(expected, model(x)) <= 1e-6                            # C1


@pytest.mark.parametrize("name", list(EXCLUDED))
def test_other_einsum_and_batched_forms_are_explained_exclusions(name):
    make, shape, words = EXCLUDED[name]
    model, x = make(), torch.randn(*shape)
    for frontend in ("auto", "export"):
        table = _table(model, x, frontend)
        assert not table.extendable()
        assert words in table.exclusions["w"], table.exclusions
        with pytest.raises(morphc.SiteError, match="w: excluded"):
            morphc.extend(model, (x,), sites="all", frontend=frontend)


@pytest.mark.parametrize("frontend", ["auto", "export"])
@pytest.mark.parametrize("make, shape", [(SITES[n][0], SITES[n][1]) for n in SITES] +
                         [(EXCLUDED[n][0], EXCLUDED[n][1]) for n in EXCLUDED] +
                         [(Attention, (2, 5, 8))])
def test_sites_and_exclusions_cover_einsum_weights(make, shape, frontend):
    model = make()
    table = _table(model, torch.randn(*shape), frontend)
    assert not linear_operator_weights(model) - table.covered()


def test_einsum_attention_projections_are_sites_and_activations_are_not():
    model, x = Attention(), torch.randn(2, 5, 8)
    table = _table(model, x, "export")
    assert {s.weight_name: s.kind for s in table.values()} == \
        {"wq": "linear", "wk": "matmul_right", "wo": "matmul_right"}
    assert not table.exclusions


def test_einsum_map_reads_equations():
    assert einsum_map("b s d , d f -> b s f", 1) == EinsumMap("matmul_right", 0)
    assert einsum_map("...i,oi->...o", 1) == EinsumMap("linear", 0)
    assert einsum_map("oi,...in->...on", 0) == EinsumMap("matmul_left", 1)
    assert einsum_map("bsd,df->bsf", 1, transposed=True) == EinsumMap("linear", 0)
    assert "operands" in einsum_map("bd,df,fg->bg", 1)
    assert "distinct" in einsum_map("bd,dd->bd", 1)
    assert "repeated" in einsum_map("bdd,df->bf", 1)
    assert "output order" in einsum_map("oi,in...->on...", 0)
    assert "not one morphc can read" in einsum_map("bs1,df->bsf", 1)


def test_grown_einsum_architecture_saves_and_loads(tmp_path):
    from morphc.space.loading import load
    from morphc.space.moves import Grow
    from morphc.space.saving import save

    model, x = SITES["bsd,df->bsf"][0](), torch.randn(4, 3, 6)
    grown = Grow(sites="all", width=2)(model, (x,))
    with torch.no_grad():
        for p in grown.parameters():
            p.add_(0.01)
    save(grown, tmp_path / "arch")
    loaded = load(tmp_path / "arch")
    with torch.no_grad():
        assert torch.equal(grown(x), loaded(x))
