"""A sixth outside-in round: architectures and model properties the repository does not ship
(recurrent cells, TorchScript parts, mixed precision, forwards that only torch.export traces).
Each keeps E1 (bit-exact at B = 0, also at another batch size) and C1 (an exact fold into the
user's own Parameters), or is refused with a typed error that says why and leaves the model
as it was."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import morphc
from tests.helpers import fold_trained, max_rel


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _unchanged(model, before):
    return all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# -- recurrent cells ----------------------------------------------------------------------------
class _Unrolled(nn.Module):
    """A cell unrolled in a Python loop, its state made with torch.zeros(x.size(0), ...), which
    symbolic_trace cannot run: the model goes to torch.export, where the cell is one aten op."""

    def __init__(self, cell):
        super().__init__()
        torch.manual_seed(0)
        self.cell, self.out = cell(4, 8), nn.Linear(8, 2)

    def forward(self, x):
        state = torch.zeros(x.size(0), 8)
        state = (state, state) if isinstance(self.cell, nn.LSTMCell) else state
        for t in range(x.size(1)):
            state = self.cell(x[:, t], state)
        return self.out(state[0] if isinstance(state, tuple) else state)


class _OneStep(nn.Module):
    """One call of the cell (no state given): symbolic_trace keeps it as a leaf module."""

    def __init__(self, cell):
        super().__init__()
        torch.manual_seed(0)
        self.cell, self.out = cell(4, 8), nn.Linear(8, 2)

    def forward(self, x):
        h = self.cell(x[:, 0])
        return self.out(h[0] if isinstance(h, tuple) else h)


@pytest.mark.parametrize("cell", [nn.RNNCell, nn.GRUCell, nn.LSTMCell])
@pytest.mark.parametrize("wrap", [pytest.param(_Unrolled, marks=pytest.mark.slow), _OneStep])
def test_rnn_cell_weights_are_listed_exclusions_and_naming_the_cell_says_why(cell, wrap):
    """nn.RNNCell / GRUCell / LSTMCell weights were silently not sites: ``inspect`` did not list
    them (nn.LSTM's are listed with their reason) and ``sites=["cell"]`` said "no site matches
    'cell'", as if the layer did not exist. The rest of the model still extends and folds."""
    model, x = wrap(cell), torch.randn(3, 2, 4)
    report = str(morphc.inspect(model, (x,)))
    assert "not a site: cell.weight_ih: fused RNN cell op" in report
    before = _state(model)
    with pytest.raises(morphc.SiteError, match=r"'cell' cannot be extended.*fused RNN cell.*"
                                               r"nn\.Linear"):
        morphc.extend(model, (x,), sites=["cell"])
    assert _unchanged(model, before)
    ext = morphc.extend(model, (x,), sites="all", width=4)
    assert [s.name for s in ext.sites] == ["out"]
    with torch.no_grad():
        assert torch.equal(ext(x), model(x))
        other = torch.randn(6, 2, 4)
        assert torch.equal(ext(other), model(other))
    extended, folded = fold_trained(model, (x,), ext)
    assert max_rel(folded, extended) < 1e-6


# -- TorchScript --------------------------------------------------------------------------------
class _ScriptedStem(nn.Module):
    """A stem compiled with torch.jit.script (or .trace) inside an ordinary Python model."""

    def __init__(self, compile_stem):
        super().__init__()
        torch.manual_seed(0)
        self.stem = compile_stem(nn.Sequential(nn.Linear(8, 8), nn.Tanh()))
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.stem(x))


def _traced(module):
    return torch.jit.trace(module, torch.randn(2, 8))


def test_a_scripted_submodule_is_called_as_it_is_and_the_rest_extends():
    """A torch.jit.script-ed submodule failed both frontends (symbolic_trace on undoing its
    attributes: "'OrderedDictWrapper' object has no attribute 'clear'"), and the TraceError
    blamed data-dependent control flow. It is a leaf of the graph now, its weights listed
    exclusions that say what to do, and the model's own layers extend and fold."""
    model, x = _ScriptedStem(torch.jit.script), torch.randn(4, 8)
    report = str(morphc.inspect(model, (x,)))
    assert "not a site: stem.0.weight: inside a torch.jit.script-ed module" in report
    with pytest.raises(morphc.SiteError, match="before scripting"):
        morphc.extend(model, (x,), sites=["stem.0"])
    ext = morphc.extend(model, (x,), sites="all", width=4)
    assert ext.traced.frontend == "symbolic_trace"
    assert [s.name for s in ext.sites] == ["head"]
    with torch.no_grad():
        assert torch.equal(ext(x), model(x))
        assert torch.equal(ext(x[:3]), model(x[:3]))
    extended, folded = fold_trained(model, (x,), ext)
    assert max_rel(folded, extended) < 1e-6


def test_a_jit_traced_submodule_is_traced_into_by_torch_export():
    """torch.export records the ops a torch.jit.trace-d module runs, by the user's parameter
    names: its layers are sites (which the scripted kind's leaf rule must not take away)."""
    model, x = _ScriptedStem(_traced), torch.randn(4, 8)
    ext = morphc.extend(model, (x,), sites="all", width=4)
    assert [s.name for s in ext.sites] == ["stem.0", "head"]
    with torch.no_grad():
        assert torch.equal(ext(x), model(x))
        assert torch.equal(ext(x[:3]), model(x[:3]))
    extended, folded = fold_trained(model, (x,), ext)
    assert max_rel(folded, extended) < 1e-6


@pytest.mark.parametrize("compile_model", [torch.jit.script, _traced])
def test_a_torchscript_model_is_refused_as_torchscript(compile_model):
    """The whole model scripted or traced: the refusal blamed "data-dependent Python control
    flow"."""
    model, x = compile_model(nn.Sequential(nn.Linear(8, 8), nn.Tanh())), torch.randn(4, 8)
    before = _state(model)
    for call in (morphc.extend, morphc.inspect):
        with pytest.raises(morphc.TraceError, match=r"TorchScript.*before scripting") as info:
            call(model, (x,))
        assert "control flow" not in str(info.value)
    assert _unchanged(model, before)


# -- a forward symbolic_trace cannot run --------------------------------------------------------
class _KeywordOnly(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x, *, temperature: float = 2.0, mask=None):
        h = torch.tanh(self.a(x)) / temperature
        if mask is not None:
            h = h * mask
        return self.b(h)


def test_falling_back_to_torch_export_prints_no_traceback(capfd):
    """symbolic_trace records ``mask`` as an input, so ``h * mask`` runs with None when the
    graph is checked; morphc then uses torch.export, as it should, but torch's ShapeProp had
    already printed that TypeError's traceback to stderr: a user saw a crash that was not one."""
    model, x = _KeywordOnly(), torch.randn(4, 8)
    ext = morphc.extend(model, (x,), sites="all", width=4)
    assert ext.traced.frontend == "export"
    assert "Traceback" not in capfd.readouterr().err
    with torch.no_grad():
        assert torch.equal(ext(x), model(x))
        assert torch.equal(ext(x[:3]), model(x[:3]))
    extended, folded = fold_trained(model, (x,), ext)
    assert max_rel(folded, extended) < 1e-6


# -- mixed precision ----------------------------------------------------------------------------
class _Float64Trunk(nn.Module):
    """A float64 layer (say a numerically delicate input transform) feeding a float32 head."""

    def __init__(self, out_dtype=torch.float32):
        super().__init__()
        torch.manual_seed(0)
        self.trunk, self.head = nn.Linear(8, 8).double(), nn.Linear(8, 3)
        self.out_dtype = out_dtype

    def forward(self, x):
        return self.head(torch.tanh(self.trunk(x.double())).float()).to(self.out_dtype)


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16])
def test_a_model_mixing_precisions_contracts_at_its_coarsest_precision(out_dtype):
    """contract's safety check took its tolerance from the first folded weight: float64 here,
    so the float32 head's ordinary rounding (8e-8) was refused as "the fold itself is wrong: a
    morphc bug", the weights restored and the user's training lost. The check now tolerates
    the least precise of the folded weights and the outputs."""
    model, x = _Float64Trunk(out_dtype), torch.randn(4, 8)
    ext = morphc.extend(model, (x,), sites="all", width=4)
    with torch.no_grad():
        assert torch.equal(ext(x), model(x))
    extended, folded = fold_trained(model, (x,), ext)
    assert folded.dtype == out_dtype
    assert max_rel(folded, extended) < (1e-6 if out_dtype == torch.float32 else 2e-3)
    assert ext.contraction_report is not None


# -- an optional input the example gave and a later call leaves out ---------------------------
class _LossWhenGiven(nn.Module):
    """Returns (prediction, loss) when given a target, else the prediction (the HF habit)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x, target=None):
        y = self.b(torch.tanh(self.a(x)))
        if target is not None:
            return y, torch.nn.functional.mse_loss(y, target)
        return y


@pytest.mark.parametrize("call", ["omitted", "None"])
def test_a_target_the_example_gave_can_be_left_out_later(call):
    """Extended with the target (symbolic_trace took the ``target is not None`` branch), the
    model called for a prediction alone raised a bare AttributeError deep in mse_loss. The call
    is now refused before computing and the extended model traces the model again for it."""
    model, x, target = _LossWhenGiven(), torch.randn(4, 8), torch.randn(4, 3)
    ext = morphc.extend(model, (x, target), sites="all", width=4)
    assert ext.traced.frontend == "symbolic_trace"
    args = (x,) if call == "omitted" else (x, None)
    with torch.no_grad(), pytest.warns(UserWarning, match="traced its model again"):
        assert torch.equal(ext(*args), model(*args))
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(ext(x, target), model(x, target),
                                                     strict=True))
    assert len(ext.retraces) == 1
    extended, folded = fold_trained(model, (x, target), ext)
    assert max_rel(folded[0], extended[0]) < 1e-6
    with torch.no_grad():
        assert torch.equal(model(*args), folded[0])
