"""The extension's parameters inside the user's own optimizer."""

from __future__ import annotations

import inspect
from collections.abc import Mapping

import torch
from torch import nn

from morphc.errors import BypassError
from morphc.runtime.snapshot import clone_state


class ExtensionGroup:
    """The extension's param group of the user's optimizer, attached only while it steps.

    ``add_param_group`` validates the group and fills in the optimizer's defaults once; then
    the group and its state live here and join ``optimizer.param_groups`` / ``optimizer.state``
    for the duration of each ``optimizer.step()``. Between steps the user's optimizer looks
    exactly as they built it, which matters because torch 2.13's LambdaLR, MultiplicativeLR,
    CyclicLR, CosineAnnealingWarmRestarts and SequentialLR zip their per-group lists *strictly*
    against ``param_groups`` (a permanently added group crashes ``scheduler.step()``), and because
    a user's own ``optimizer.state_dict()`` must keep loading into a fresh optimizer.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, params: list[nn.Parameter],
                 options: Mapping) -> None:
        group = {k: v for k, v in training_group(optimizer).items() if k != "params"}
        if "weight_decay" in group:
            group["weight_decay"] = 0.0   # decay is no path to C: the return phase is
        group.update(options)
        group["params"] = params
        optimizer.add_param_group(group)
        self.group = optimizer.param_groups.pop()
        self.optimizer, self.state = optimizer, {}

    @property
    def params(self) -> list[nn.Parameter]:
        return self.group["params"]

    @property
    def attached(self) -> bool:
        return any(g is self.group for g in self.optimizer.param_groups)

    def attach(self) -> None:
        """Join ``optimizer.param_groups`` / ``optimizer.state`` until :meth:`detach` (a trainer
        integration does this from the optimizer's step pre-hook, so a trainer's own
        ``optimizer.step()`` moves the extension too)."""
        if not self.attached:
            self.optimizer.param_groups.append(self.group)
            self.optimizer.state.update(self.state)

    def detach(self) -> None:
        groups, state = self.optimizer.param_groups, self.optimizer.state
        groups[:] = [g for g in groups if g is not self.group]
        self.state = {p: state.pop(p) for p in self.params if p in state}

    def step(self) -> None:
        """``optimizer.step()`` over the user's groups and this one, in one call."""
        self.attach()
        try:
            self.optimizer.step()
        finally:
            self.detach()

    def zero_grad(self) -> None:
        for param in self.params:
            param.grad = None

    def state_dict(self, names: Mapping[nn.Parameter, str]) -> dict:
        return {"group": {k: v for k, v in self.group.items() if k != "params"},
                "state": {names[p]: clone_state(s) for p, s in self.state.items()}}

    def load_state_dict(self, state: dict, params: Mapping[str, nn.Parameter]) -> None:
        self.group.update(state["group"])
        self.state = {params[n]: clone_state(s) for n, s in state["state"].items()}


def training_group(optimizer: torch.optim.Optimizer) -> dict:
    """The param group whose lr (and other settings) the extension follows: group 0, unless it
    does not train — lr 0 or only frozen parameters, as a held backbone in fine-tuning — then the
    first group that does (at lr 0 the branches would never leave B = 0)."""
    for group in optimizer.param_groups:
        if float(group.get("lr", 0.0)) > 0 and any(p.requires_grad for p in group["params"]):
            return group
    return optimizer.param_groups[0]


def make_optimizer(model: nn.Module, optimizer) -> torch.optim.Optimizer:
    """Accept a ready optimizer (it must hold the model's trainable parameters; frozen ones
    may be left out, as fine-tuning code does) or build one."""
    if isinstance(optimizer, torch.optim.Optimizer):
        held = {id(p) for g in optimizer.param_groups for p in g["params"]}
        missing = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in held]
        if missing:
            raise BypassError(f"the optimizer does not hold the model's parameters {missing[:5]}"
                              "; build it over model.parameters() or pass a factory "
                              "lambda params: torch.optim.Adam(params, ...)")
        return _drivable(optimizer)
    if not callable(optimizer):
        raise BypassError("optimizer must be a torch.optim.Optimizer or a factory "
                          f"params -> Optimizer, got {type(optimizer).__name__}")
    built = optimizer(list(model.parameters()))
    if not isinstance(built, torch.optim.Optimizer):
        raise BypassError(f"the optimizer factory returned {type(built).__name__}, not a "
                          "torch.optim.Optimizer")
    return _drivable(built)


def _drivable(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """Refuse, before anything runs, an optimizer no cycle could step. Bypass computes the loss
    and gradients once, then calls ``optimizer.step()``: one whose step must re-evaluate the
    loss itself (LBFGS) cannot be driven that way. The extension's parameters join the user's
    optimizer and their gradients are dense, which SparseAdam refuses."""
    if isinstance(optimizer, torch.optim.SparseAdam):
        raise BypassError("SparseAdam steps sparse gradients only, and the parameters a Bypass "
                          "cycle adds to the optimizer get dense ones: use an optimizer that "
                          "takes both, SGD or Adagrad (e.g. lambda params: "
                          "torch.optim.Adagrad(params, lr=...)), for nn.Embedding(sparse=True)")
    closure = inspect.signature(optimizer.step).parameters.get("closure")
    if closure is not None and closure.default is inspect.Parameter.empty:
        raise BypassError(f"{type(optimizer).__name__}.step needs a closure that re-evaluates "
                          "the loss, and Bypass steps the optimizer once per bp.step after its "
                          "own backward: use a first-order optimizer (SGD, Adam, AdamW, ...)")
    return optimizer


def loss_sign(optimizer: torch.optim.Optimizer) -> float:
    """+1 when the optimizer minimises the closure's value, −1 when it maximises it
    (``maximize=True``): Bypass judges every cycle by a number to minimise. Groups that disagree
    leave no such number."""
    ways = {bool(g.get("maximize", False)) for g in optimizer.param_groups}
    if len(ways) > 1:
        raise BypassError("the optimizer's param groups disagree on maximize=: Bypass keeps a "
                          "cycle when it lowers the closure's value (raises it, with "
                          "maximize=True for every group), so it cannot judge a mix; return the "
                          "loss to minimise and drop maximize=")
    return -1.0 if ways == {True} else 1.0
