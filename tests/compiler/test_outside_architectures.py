"""The compiler probed from outside with architectures and PyTorch features the repository
does not ship: each case keeps E1 (bit-exact at B = 0) and C1 (an exact fold into the user's
own Parameters), or is refused with a typed error that leaves the user's model as it was."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import morphc
from tests.helpers import fold_trained as _fold
from tests.helpers import max_rel, train_extension


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))




@pytest.mark.parametrize("context", [torch.inference_mode, torch.no_grad])
def test_extending_inside_inference_mode_gives_branches_that_train(context):
    """``morphc.extend`` called inside ``torch.inference_mode()`` (an evaluation block) made
    the branch parameters inference tensors: the first training step failed with torch's
    "Inference tensors cannot be saved for backward"."""
    model, x = _mlp(), torch.randn(4, 8)
    with context():
        ext = morphc.extend(model, (x,), sites="all", width=4)
    assert not any(p.is_inference() for p in ext.parameters())
    with torch.no_grad():
        assert torch.equal(ext(x), model(x))
    extended, folded = _fold(model, (x,), ext)
    assert max_rel(folded, extended) < 1e-6


def test_contract_inside_inference_mode():
    model, x = _mlp(), torch.randn(4, 8)
    ext = morphc.extend(model, (x,), sites="all", width=4)
    train_extension(ext, (x,))
    ext.set_homotopy(0.0)
    with torch.no_grad():
        extended = ext(x)
    with torch.inference_mode():
        morphc.contract(ext)
    assert not any(p.is_inference() for p in model.parameters())
    with torch.no_grad():
        assert max_rel(model(x), extended) < 1e-6
    F.mse_loss(model(x), torch.zeros(4, 3)).backward()      # the user's model still trains


class _Teacher(nn.Module):
    """A frozen-by-context teacher (EMA / target network) next to a trained student."""

    def __init__(self, context):
        super().__init__()
        torch.manual_seed(0)
        self.teacher, self.student, self.head = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 3)
        self.context = context

    def forward(self, x):
        with self.context():
            target = torch.tanh(self.teacher(x))
        return self.head(torch.tanh(self.student(x)) + target)


class _Autocast(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            h = torch.tanh(self.a(x))
        return self.b(h.float())


_SWITCHES = {
    "no_grad": lambda: _Teacher(torch.no_grad),
    "set_grad_enabled": lambda: _Teacher(lambda: torch.set_grad_enabled(False)),
    "autocast": _Autocast,
}


def _grads(module, model, x):
    model.zero_grad(set_to_none=True)
    module(x).square().sum().backward()
    return {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("case", _SWITCHES)
def test_a_forward_that_switches_grad_mode_or_autocast_keeps_it(case):
    """symbolic_trace does not record ``with torch.no_grad():`` or ``torch.autocast`` inside a
    forward: the graph trained the teacher the forward froze (its weights got gradients), and
    computed the autocast region in float32 (E1 broke). Such a forward now goes to
    torch.export, which keeps both; the weights inside are listed as exclusions."""
    model, x = _SWITCHES[case](), torch.randn(4, 8)
    ext = morphc.extend(model, (x,), sites="all", width=4)
    assert ext.traced.frontend == "export"
    with torch.no_grad():
        assert torch.equal(ext(x), model(x))
    expected, got = _grads(model, model, x), _grads(ext, model, x)
    assert {n for n, g in got.items() if g is None} == {n for n, g in expected.items() if g is None}
    assert all(torch.equal(got[n], g) for n, g in expected.items() if g is not None)
    inside = "teacher" if case != "autocast" else "a"
    assert inside not in [s.name for s in ext.sites]
    assert f"{inside}.weight" in str(morphc.inspect(model, (x,)))
    extended, folded = _fold(model, (x,), ext)
    assert max_rel(folded, extended) < 1e-6


def test_symbolic_trace_alone_refuses_a_forward_that_switches_grad_mode():
    model, x = _Teacher(torch.no_grad), torch.randn(4, 8)
    with pytest.raises(morphc.TraceError, match="no_grad"):
        morphc.extend(model, (x,), sites="all", frontend="symbolic_trace")


def test_inference_mode_inside_a_forward_is_refused_typed():
    """Neither frontend records ``torch.inference_mode()`` in a forward (torch.export drops it
    too): the graph trained the teacher. It is a TraceError that names the fix."""
    model, x = _Teacher(torch.inference_mode), torch.randn(4, 8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(morphc.TraceError, match=r"inference_mode.*torch.no_grad\(\) there"):
        morphc.extend(model, (x,), sites="all")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_complex_weights_are_listed_exclusions_not_sites():
    """A complex Linear was extended with a real-valued family: contract then refused with
    "the fold itself is wrong: a morphc bug" (the fold cast p, q to float64, dropping the
    imaginary part). Complex weights are exclusions with their reason now."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8, dtype=torch.cfloat), nn.Linear(8, 3, dtype=torch.cfloat))
    x = torch.randn(4, 8, dtype=torch.cfloat)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(morphc.SiteError, match="complex64.*real-valued"):
        morphc.extend(model, (x,), sites="all")
    assert "real-valued" in str(morphc.inspect(model, (x,)))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@dataclasses.dataclass
class _Output:
    logits: torch.Tensor
    hidden: torch.Tensor


class _ReturnsDataclass(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 2)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        return _Output(self.b(h), h)


def test_a_model_returning_a_dataclass_is_told_the_registration_that_makes_it_work():
    """The refusal said "register a pytree node"; it now names the one call that works, and
    after it the model extends and folds (the output stays the user's dataclass)."""
    model, x = _ReturnsDataclass(), torch.randn(4, 8)
    with pytest.raises(morphc.TraceError, match=r"register_dataclass\(_Output\)"):
        morphc.extend(model, (x,), sites="all")
    torch.utils._pytree.register_dataclass(_Output)
    try:
        ext = morphc.extend(model, (x,), sites="all", width=4)
        with torch.no_grad():
            got, expected = ext(x), model(x)
        assert type(got) is _Output
        assert torch.equal(got.logits, expected.logits) and torch.equal(got.hidden, expected.hidden)
    finally:
        torch.utils._pytree._deregister_pytree_node(_Output)


@pytest.mark.parametrize("call", [morphc.extend, morphc.inspect])
def test_no_example_inputs_says_that_inputs_are_needed(call):
    """``morphc.extend(model)`` with no inputs said "the model fails on the example inputs"
    with torch's missing-argument error, as if the user had passed wrong ones."""
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(morphc.TraceError, match="none were given"):
        call(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_global_module_hook_is_named_when_contraction_is_refused():
    """A global forward hook that rescales Linear outputs runs in the user's model but not the
    same way in the extended graph; contract's refusal blamed "a morphc bug"."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    x = torch.randn(16, 4)
    ext = morphc.extend(model, (x,), sites="all", width=2)
    train_extension(ext, (x,))
    ext.set_homotopy(0.0)
    handle = nn.modules.module.register_module_forward_hook(
        lambda module, args, out: out * 2 if isinstance(module, nn.Linear) else None)
    try:
        with pytest.raises(morphc.ContractionError, match="global module hook") as info:
            morphc.contract(ext)
    finally:
        handle.remove()
    assert "morphc bug" not in str(info.value)
