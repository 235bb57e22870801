"""Probes from a sixth outside-in round, on model properties: a model with a TorchScript part
trains under Bypass (and the trainer callbacks) as under plain training, and a model that is
TorchScript as a whole is refused at construction, typed."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import morphc
from morphc.integrations.core import TrainerBypass
from tests.helpers import state_differences, train_step, training_state

STEPS = 10


class ScriptedStem(nn.Module):
    """A torch.jit.script-ed stem (compiled once, shared with a deployment) and a Python head."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem = torch.jit.script(nn.Sequential(nn.Linear(6, 12), nn.Tanh()))
        self.h, self.out = nn.Linear(12, 12), nn.Linear(12, 3)

    def forward(self, x):
        return self.out(torch.tanh(self.h(self.stem(x))))


def _batches(n=STEPS):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 6, generator=g), torch.randn(16, 3, generator=g)) for _ in range(n)]


def _run(with_bypass: bool):
    model = ScriptedStem()
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-2)
    bp = morphc.Bypass(model, optimizer, trigger=morphc.Schedule(every=4), bypass_steps=3,
                       return_steps=3, verbose=False,
                       eval_closure=lambda m: torch.tensor(1.0)) if with_bypass else None
    for x, y in _batches():
        train_step(bp, model, optimizer, lambda m, x=x, y=y: F.mse_loss(m(x), y))
    if bp is not None:
        assert bp.finish() is model
    return training_state(model, optimizer), bp


@pytest.mark.slow
def test_a_model_with_a_scripted_submodule_cycles_and_ends_where_plain_training_does():
    """Bypass hooked every submodule (state-dict loads, which submodules a closure ran) and a
    ScriptModule takes no hooks: the constructor and the first step raised torch's
    RuntimeError. Cycles now run (the scripted stem called whole, its weights trained as plain
    training trains them), and cycles that never pay end bit for bit where plain training
    ends. (The plain-training copy's optimizer stepped tensors of its own: deepcopy copies a
    scripted module's tensors in C++, unrecorded in the memo the optimizer's copy used.)
    TorchScript's optimizing executor changes a scripted module's rounding after its first
    runs, and Bypass runs the model more often than plain training: it is switched off here so
    that "bit for bit" tests morphc, not the executor's warm-up."""
    with torch.jit.optimized_execution(False):
        plain, _ = _run(False)
        got, bp = _run(True)
    events = [e["event"] for e in bp.history]
    assert "extend" in events and "rollback" in events
    assert state_differences(got, plain) == []


def test_trainer_callbacks_attach_to_a_model_with_a_scripted_submodule():
    model = ScriptedStem()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
    tb = TrainerBypass(morphc.Schedule(at=[2]), bypass_steps=3, return_steps=2, verbose=False)
    tb.attach(model, optimizer)
    for step, (x, y) in enumerate(_batches(9), start=1):
        tb.before_micro_batch()
        loss = F.mse_loss(model(x), y)
        tb.record_loss(loss)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        tb.after_step(step)
    tb.finish()
    assert [e["event"] for e in tb.history][:2] == ["extend", "return"]


@pytest.mark.parametrize("example_inputs", [None, (torch.randn(4, 6),)])
def test_bypass_refuses_a_torchscript_model_at_construction(example_inputs):
    """Without example inputs the first step raised torch's RuntimeError (no hooks on a
    ScriptModule); with them the run started and no cycle could ever trace it."""
    model = torch.jit.script(nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)))
    with pytest.raises(morphc.BypassError, match="TorchScript.*before scripting"):
        morphc.Bypass(model, torch.optim.Adam(model.parameters()), verbose=False,
                      example_inputs=example_inputs)
