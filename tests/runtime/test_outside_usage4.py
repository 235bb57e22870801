"""Probes from a fifth outside-in round: loss kinds and closure habits — gradient penalties,
several forwards, submodules called directly, a closure that runs backward only later in the
run, a closure that goes wrong once mid-cycle. Errors are typed and say what to do; a user who
catches one and trains on is where plain training would be."""

import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import morphc
from tests.helpers import regression_task, state_differences, train_step, training_state

STEPS = 14


class EncoderDecoder(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.encoder = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
        self.decoder = nn.Linear(3, 6)

    def forward(self, x):
        return self.decoder(self.encoder(x))


def _bypass(model, optimizer, **kw):
    """Cycles every 4 steps, none of which can pay (the eval closure is a constant)."""
    options = dict(trigger=morphc.Schedule(every=4), bypass_steps=3, return_steps=3,
                   verbose=False, eval_closure=lambda m: torch.tensor(1.0))
    options.update(kw)
    return morphc.Bypass(model, optimizer, **options)


# -- a closure that calls the model's submodules, never the model -------------------------------
def test_a_closure_calling_submodules_only_is_told_to_put_them_in_forward():
    # an autoencoder trained as m.decoder(m.encoder(x)): the error said "pass example_inputs=",
    # after which every cycle failed ('ExtendedModel' object has no attribute 'encoder'), rolled
    # back with a warning: a run that could never morph. Say what does work instead
    model = EncoderDecoder()
    bp = morphc.Bypass(model, torch.optim.Adam(model.parameters()), verbose=False)
    x = torch.randn(4, 6)
    with pytest.raises(morphc.BypassError) as info:
        bp.step(lambda m: F.mse_loss(m.decoder(m.encoder(x)), x))
    message = str(info.value)
    assert "encoder" in message and "decoder" in message and "forward" in message
    assert "example_inputs" not in message


def test_a_closure_that_never_runs_the_model_still_hears_of_example_inputs():
    model, _ = regression_task(0, 1)
    bp = morphc.Bypass(model, torch.optim.Adam(model.parameters()), verbose=False)
    with pytest.raises(morphc.BypassError, match="example_inputs"):
        bp.step(lambda m: sum(p.square().sum() for p in m.parameters()))


# -- a closure that calls backward itself, first after step 0 ------------------------------------
@pytest.mark.parametrize("at", [2, 5])        # outside a cycle; inside one (cycle from step 4)
def test_a_closure_calling_backward_later_in_the_run_gets_a_typed_error(at):
    # only the first step was checked: a closure written with backward() later in the run (a
    # second loss, a new phase of training) failed with torch's "backward through the graph a
    # second time", untyped
    model, batches = regression_task(0, STEPS)
    bp = _bypass(model, torch.optim.Adam(model.parameters(), lr=5e-2))

    def calls_backward(m, x, y):
        loss = F.mse_loss(m(x), y)
        loss.backward()
        return loss

    for x, y in batches[:at]:
        bp.step(lambda m, x=x, y=y: F.mse_loss(m(x), y))
    x, y = batches[at]
    with pytest.raises(morphc.BypassError, match="backward"):
        bp.step(lambda m: calls_backward(m, x, y))


# -- a typed error mid-cycle, caught, and training goes on ---------------------------------------
def _bad_closures():
    def no_grad(m, x, y):
        with torch.no_grad():
            return F.mse_loss(m(x), y)
    return {"no_grad": no_grad, "tuple": lambda m, x, y: (F.mse_loss(m(x), y), {})}


@pytest.mark.parametrize("bad", sorted(_bad_closures()))
def test_a_typed_error_caught_mid_cycle_leaves_the_run_where_plain_training_is(bad):
    # the error rolled the cycle back to the state from before it, although plain training
    # beside it held the steps since: a user who caught the error and trained on had lost them
    # (every weight and Adam moment differed from plain training's without the bad batch)
    bad_at, closure = 6, _bad_closures()[bad]
    model, batches = regression_task(0, STEPS)
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-2)
    for i, (x, y) in enumerate(batches):
        if i != bad_at:
            optimizer.zero_grad()
            F.mse_loss(model(x), y).backward()
            optimizer.step()
    expected = training_state(model, optimizer)

    model, batches = regression_task(0, STEPS)
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-2)
    bp = _bypass(model, optimizer)
    for i, (x, y) in enumerate(batches):
        if i == bad_at:
            assert bp.phase == "bypass"
            with pytest.raises(morphc.BypassError):
                bp.step(lambda m, x=x, y=y: closure(m, x, y))
        else:
            bp.step(lambda m, x=x, y=y: F.mse_loss(m(x), y))
    bp.finish()
    assert [e["to"] for e in bp.history if e["event"] == "rollback"][0] == "plain"
    assert state_differences(expected, training_state(model, optimizer)) == []


# -- what works: losses that differentiate inside, several forwards, dict outputs ---------------
def test_a_wgan_gp_critic_whose_cycles_never_pay_is_plain_training_bit_for_bit():
    # a gradient penalty (autograd.grad(create_graph=True) on interpolated inputs), two more
    # forwards, a loss that goes negative: handed over bit for bit
    def run(with_bypass):
        torch.manual_seed(0)
        critic = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 1))
        optimizer = torch.optim.Adam(critic.parameters(), lr=1e-2, betas=(0.5, 0.9))
        bp = _bypass(critic, optimizer) if with_bypass else None
        gen = torch.Generator().manual_seed(1)
        for _ in range(STEPS):
            real, fake = torch.randn(16, 2, generator=gen) + 2, torch.randn(16, 2, generator=gen)
            a = torch.rand(16, 1, generator=gen)

            def loss(m, real=real, fake=fake, a=a):
                inter = (a * real + (1 - a) * fake).requires_grad_(True)
                g, = torch.autograd.grad(m(inter).sum(), inter, create_graph=True)
                return m(fake).mean() - m(real).mean() + 10 * ((g.norm(dim=1) - 1) ** 2).mean()
            train_step(bp, critic, optimizer, loss)
        if bp is not None:
            bp.finish()
            assert [e["to"] for e in bp.history if e["event"] == "rollback"] == ["plain"]
        return training_state(critic, optimizer)
    assert state_differences(run(False), run(True)) == []


# -- what a closure reads off the module besides calling it --------------------------------------
class Uncertain(nn.Module):
    """A regression with a learned log-variance the forward does not use (Kendall's weighting)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
        self.log_var = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        return self.net(x)


def test_a_closure_reading_a_parameter_off_the_module_can_morph():
    # 0.5 * (exp(-m.log_var) * mse + m.log_var): every cycle failed at its first step
    # ('ExtendedModel' object has no attribute 'log_var') and was rolled back — never a morph
    model, (_, batches) = Uncertain(), regression_task(0, STEPS)
    bp = _bypass(model, torch.optim.Adam(model.parameters(), lr=5e-2), accept="always",
                 eval_closure=None, probation_steps=0)
    for x, y in batches:
        bp.step(lambda m, x=x, y=y: 0.5 * (torch.exp(-m.log_var) * F.mse_loss(m(x), y)
                                           + m.log_var))
    bp.finish()
    assert [e["event"] for e in bp.history if e["event"] in ("contract", "rollback")] == \
        ["contract", "contract"]


class Configured(Uncertain):
    """A model carrying its settings in ``config``, as every Hugging Face model does."""

    def __init__(self):
        super().__init__()
        self.config = types.SimpleNamespace(num_labels=3, loss_weight=0.5)


def test_a_closure_reading_the_models_config_can_morph():
    # m.config.num_labels in a loss (HF style): during a cycle m.config was the extension's
    # settings ('ExtensionConfig' has no attribute 'num_labels') — every cycle rolled back
    model, (_, batches) = Configured(), regression_task(0, STEPS)
    bp = _bypass(model, torch.optim.Adam(model.parameters(), lr=5e-2), accept="always",
                 eval_closure=None, probation_steps=0)
    for x, y in batches:
        bp.step(lambda m, x=x, y=y: m.config.loss_weight * F.mse_loss(
            m(x).view(-1, m.config.num_labels), y))
    assert bp.model.config is model.config
    bp.finish()
    assert [e["event"] for e in bp.history if e["event"] in ("contract", "rollback")] == \
        ["contract", "contract"]


def test_a_closure_running_an_extended_submodule_outside_the_call_is_told_what_to_do():
    # m(x) and m.encoder(x) in one loss: outside m(...) the encoder would run without its
    # branches; the cycle is rolled back with a warning that says so
    model, x = EncoderDecoder(), torch.randn(8, 6)
    bp = _bypass(model, torch.optim.Adam(model.parameters(), lr=5e-2))
    with pytest.warns(RuntimeWarning, match="m.encoder holds extended layers"):
        for _ in range(6):
            bp.step(lambda m: F.mse_loss(m(x), x) + m.encoder(x).square().mean())
    assert [e["to"] for e in bp.history if e["event"] == "rollback"] == ["plain"]
