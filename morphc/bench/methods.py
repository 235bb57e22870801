"""The morphc methods of the suite: Bypass, permanent growth, and the linear-bypass ablation.

- ``bypass``: ``morphc.Bypass`` with its library defaults (Plateau trigger, all sites, width 8,
  tanh, anneal), phases scaled to the step budget.
- ``growth``: the same extension at the same trigger, never contracted — the model keeps the
  extra parameters (what "just make it bigger" buys).
- ``linear_bypass``: the same cycle with ρ affine from the start (homotopy 0 for the whole
  bypass phase: a LoRA-like branch). It cannot open new descent directions, so it should not
  escape a saddle: the check that the learnable non-linearity is what matters.
"""

from __future__ import annotations

import torch
from torch import nn

import morphc
from morphc.bench.baselines import adam, default_window, register, stepper_method
from morphc.bench.problems import Problem


def _phase_steps(steps: int) -> int:
    """100 steps per phase (the library default) within budgets of ≥ 2000 steps, less below."""
    return max(10, min(100, steps // 20))


def bypass_stepper(problem: Problem, model: nn.Module, seed: int, steps: int):
    phase = _phase_steps(steps)
    return morphc.Bypass(model, adam(problem), trigger=morphc.Plateau(window=default_window(steps)),
                         bypass_steps=phase, return_steps=phase, seed=seed, verbose=False)


class ExtendOnPlateau:
    """Adam; at the first plateau, extend every site and train the extended model.

    ``contract_after=None`` keeps the extension for good (growth); an int contracts after that
    many steps. ``homotopy`` is held fixed while extended (1.0 free ρ, 0.0 affine ρ).
    """

    def __init__(self, problem: Problem, model: nn.Module, seed: int, steps: int, *,
                 homotopy: float, contract_after: int | None) -> None:
        self.user_model, self._model, self.seed = model, model, seed
        self.optimizer = adam(problem)(model.parameters())
        self.trigger = morphc.Plateau(window=default_window(steps))
        self.homotopy, self.contract_after = homotopy, contract_after
        self.ext, self.extended_steps, self.done = None, 0, False
        self.events: dict = {"extended_at": None, "contracted_at": None}
        self.step_count, self._inputs = 0, None
        model.register_forward_pre_hook(self._capture, with_kwargs=False)

    def _capture(self, module, args):
        if self._inputs is None:
            self._inputs = tuple(a.detach() for a in args)

    @property
    def model(self) -> nn.Module:
        return self._model

    def step(self, closure) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        loss = closure(self._model)
        loss.backward()
        self.optimizer.step()
        self.step_count += 1
        if self.ext is None and not self.done and self.trigger.update(loss.item(),
                                                                      step=self.step_count):
            self._extend()
        elif self.ext is not None:
            self.extended_steps += 1
            if self.contract_after is not None and self.extended_steps >= self.contract_after:
                self._contract()
        return loss.detach()

    def _extend(self) -> None:
        self.ext = morphc.extend(self.user_model, self._inputs, sites="all", width=8,
                                 seed=self.seed)
        self.ext.set_homotopy(self.homotopy)
        self.optimizer.add_param_group({"params": list(self.ext.extension_parameters())})
        self._model = self.ext
        self.events["extended_at"] = self.step_count

    def _contract(self) -> None:
        self.ext.set_homotopy(0.0)
        morphc.contract(self.ext)
        self.optimizer.param_groups.pop()
        self.ext, self._model, self.done = None, self.user_model, True
        self.events["contracted_at"] = self.step_count

    def finish(self) -> nn.Module:
        return self._model


def growth_stepper(problem, model, seed, steps):
    return ExtendOnPlateau(problem, model, seed, steps, homotopy=1.0, contract_after=None)


def linear_bypass_stepper(problem, model, seed, steps):
    return ExtendOnPlateau(problem, model, seed, steps, homotopy=0.0,
                           contract_after=2 * _phase_steps(steps))


MORPHC_METHODS = [
    register(stepper_method("bypass", bypass_stepper,
                            "morphc.Bypass, library defaults (plateau → extend all sites, "
                            "width 8, tanh → anneal → contract)")),
    register(stepper_method("growth", growth_stepper,
                            "extend all sites (width 8, tanh) at the first plateau and keep "
                            "the extension: more parameters")),
    register(stepper_method("linear_bypass", linear_bypass_stepper,
                            "ablation: the same branch with ρ affine throughout (LoRA-like), "
                            "contracted after the same number of steps")),
]
