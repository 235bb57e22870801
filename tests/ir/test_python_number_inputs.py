"""A Python number among a model's inputs (``temperature=t`` annealed each step, a
``training_stage=2`` flag) is baked into an exported graph as a constant. A call with another
value must be named as that — the argument, its old and new values, and to pass a tensor — not
as a shape the graph refuses ("input '?', dimension ?"), and a float that keeps changing must not
spend every re-trace; passed as a tensor, the same value lets a Bypass cycle run."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import morphc
from morphc.ir.python_numbers import value_guard_error


class Tempered(nn.Module):
    """``x.dim()`` in Python control flow defeats symbolic_trace, so torch.export traces it."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 1)

    def forward(self, x, temperature=1.0):
        if x.dim() == 3:
            x = x.mean(1)
        return self.b(torch.tanh(self.a(x)) / temperature)


class Staged(nn.Module):
    """An int stage and a bool switch, both read by Python control flow."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 1)

    def forward(self, x, stage, scaled=True):
        h = torch.tanh(self.a(x))
        if stage >= 2:
            h = h * 2
        return self.b(h * 0.5 if scaled else h)


def _calls(ext, *calls):
    """Each call's output, and the morphc warnings they raised."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outputs = [ext(*args, **kwargs) for args, kwargs in calls]
    return outputs, [str(w.message) for w in caught if "morphc" in str(w.message)]


def test_a_changed_float_names_the_argument_its_values_and_the_remedy():
    torch.manual_seed(0)
    model, x = Tempered(), torch.randn(8, 4)
    ext = morphc.extend(model, (x,), kwargs={"temperature": 1.0}, sites="all", width=2)
    assert ext.traced.frontend == "export"
    (out,), said = _calls(ext, ((x,), {"temperature": 0.5}))
    assert torch.allclose(out, model(x, temperature=0.5))      # traced again: still right
    assert len(said) == 1 and "dimension ?" not in said[0] and "'?'" not in said[0]
    for part in ("'temperature'", "2nd parameter, given by keyword", "Python float",
                 "example value 1.0", "gives 0.5", "temperature=torch.tensor(0.5)",
                 "register_buffer('temperature'"):
        assert part in said[0], part
    # changed again: refused at once, not after max_retraces more exports
    with pytest.raises(morphc.ShapeError, match=r"'temperature'.*changed again \(1\.0, then "
                       r"0\.5, now 0\.25\).*refuses it now"):
        ext(x, temperature=0.25)
    assert len(ext.retraces) == 1


@pytest.mark.parametrize("call, named", [
    (((2,), {}), ["'stage'", "2nd parameter, given positionally", "Python int",
                  "example value 1", "gives 2", "stage=torch.tensor(2)"]),
    (((1,), {"scaled": False}), ["'scaled'", "3rd parameter, given by keyword",
                                 "Python bool", "example value True", "gives False"]),
])
def test_a_changed_int_or_bool_flag_is_named_and_traced_again(call, named):
    torch.manual_seed(0)
    model, x = Staged(), torch.randn(8, 4)
    ext = morphc.extend(model, (x, 1), sites="all", width=2)
    assert ext.traced.frontend == "export"
    args, kwargs = call
    (out,), said = _calls(ext, ((x, *args), kwargs))
    assert torch.allclose(out, model(x, *args, **kwargs))
    assert len(said) == 1 and "dimension ?" not in said[0]
    for part in named:
        assert part in said[0], part


def test_a_value_guard_is_not_called_a_shape():
    error = value_guard_error("Guard failed: temperature == 1.0")
    assert isinstance(error, morphc.ShapeError) and "dimension" not in str(error)
    assert "'temperature'" in str(error) and "torch.tensor(" in str(error)
    assert value_guard_error("Guard failed: x.size()[0] == 8") is None


def _bypass_run(as_tensor: bool):
    """A loop annealing ``temperature`` every step, as a Python float or as a tensor."""
    torch.manual_seed(0)
    model = Tempered()
    x, y = torch.randn(32, 4), torch.randn(32, 1)
    bp = morphc.Bypass(model, lambda p: torch.optim.SGD(p, lr=0.05),
                       trigger=morphc.Schedule(at=[3]), bypass_steps=4, return_steps=4,
                       verbose=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(16):
            t = 1.0 + 0.01 * step
            t = torch.tensor(t) if as_tensor else t
            bp.step(lambda m, t=t: F.mse_loss(m(x, temperature=t), y))
        bp.finish()
    said = [str(w.message) for w in caught if "morphc" in str(w.message)]
    return bp, said


def test_an_annealed_float_rolls_back_at_once_saying_so_and_a_tensor_keeps_the_cycle():
    bp, said = _bypass_run(as_tensor=False)
    rolled = [e for e in bp.history if e["event"] == "rollback"]
    assert rolled and "'temperature'" in rolled[0]["reason"]
    assert sum("traced its model again" in s for s in said) <= 1      # not 8 re-exports
    back = next(s for s in said if "rolled a cycle back" in s)
    assert "refused an input" in back and "Python float" in back and "torch.tensor(" in back
    bp, said = _bypass_run(as_tensor=True)
    events = [e["event"] for e in bp.history]
    assert "rollback" not in events and "contract" in events, (events, said)
    assert not any("traced its model again" in s for s in said)
