"""Training methods compared by ``morphc bench``: the usual remedies, and a slot for Bypass.

A method is a :class:`Method`: a name, a description and a ``run(problem, seed, steps, on_step)``
callable that returns a :class:`RunResult`. Most methods only differ in how one training step is
taken, so they are written as a *stepper* — any object with ``step(closure) -> loss``, ``model``
and ``finish() -> nn.Module``, the same interface as ``morphc.Bypass`` — and
:func:`~morphc.bench.training.train` supplies everything else (seeding, data, minibatches, timing,
evaluation). Adding a method is one line::

    register(stepper_method(
        "bypass", lambda problem, model, seed, steps: morphc.Bypass(model, adam(problem)),
        "Adam + Bypass (extend on plateau, contract back)"))

Baselines here, all under the same step budget, seeds and optimizer (the problem's own:
Adam or SGD with momentum, see ``Problem.optimizer``):

- ``plain``: the problem's optimizer alone (the reference every ratio is taken against);
- ``perturb``: noise on plateau; ``warm_restarts``: a warm restart on plateau. Both are
  :class:`~morphc.bench.remedies.RemedyStepper` cycles: the same ``morphc.Plateau`` trigger,
  cycle length, budget rule, acceptance test and rollback as ``morphc.Bypass``, so only the move
  differs.

This module is the registry; the shared training loop is in :mod:`morphc.bench.training`, the
shared cycle rules in :mod:`morphc.bench.cycles`, the remedies in :mod:`morphc.bench.remedies`.
"""

from __future__ import annotations

from morphc.bench.problems import by_name
from morphc.bench.remedies import remedy_method
from morphc.bench.training import Method, OptimizerStepper, stepper_method

PLAIN = "plain"

METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add (or replace) a method under its name; returns it, so it can be used inline."""
    METHODS[method.name] = method
    return method


BASELINES = [
    register(stepper_method(
        PLAIN, lambda problem, model, seed, steps: OptimizerStepper(
            model, problem.make_optimizer(model.parameters())),
        "plain training with the problem's optimizer")),
    register(remedy_method(
        "perturb", "noise",
        "noise on plateau: weights += noise of norm 0.02·‖θ‖, kept only if it pays")),
    register(remedy_method(
        "warm_restarts", "restart",
        "warm restart on plateau: optimizer state cleared, lr 3× cosine-annealed back, kept "
        "only if it pays")),
]


def get_methods(names=None) -> list[Method]:
    """Methods by name (all registered when ``names`` is None); Method objects pass through."""
    return by_name(METHODS, names, "method")
