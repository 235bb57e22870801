"""What a rollback restores: the user's parameters, buffers and optimizer state, bit for bit."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn


def clone_state(state: Mapping) -> dict:
    """A deep copy of one parameter's optimizer state (tensors cloned, numbers kept)."""
    return {k: (v.detach().clone() if isinstance(v, torch.Tensor) else v)
            for k, v in state.items()}


class Snapshot:
    """The user's model and optimizer as they were right before an extension. Kept by name, so it
    survives a checkpoint; restored into the *same* tensors, so the optimizer and any compiled
    graph keep pointing at them."""

    def __init__(self, params: dict, buffers: dict, opt_state: dict,
                 owners: dict | None = None) -> None:
        self.params, self.buffers, self.opt_state = params, buffers, opt_state
        self.owners = owners    # name -> the tensor saved under it (None: from a checkpoint)
        self.outside: list = []   # (tensor, value, optimizer state) trained outside the model

    @classmethod
    def take(cls, model: nn.Module, optimizer: torch.optim.Optimizer) -> Snapshot:
        named = dict(model.named_parameters())
        params = {n: p.detach().clone() for n, p in named.items()}
        buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
        opt_state = {n: clone_state(optimizer.state[p]) for n, p in named.items()
                     if p in optimizer.state}
        owners = {**dict(model.named_buffers()), **named}
        snapshot = cls(params, buffers, opt_state, owners)
        snapshot.outside = [(p, p.detach().clone(), clone_state(optimizer.state[p])
                             if p in optimizer.state else None)
                            for p in trained_outside(model, optimizer)]
        return snapshot

    def _saved(self, name: str, tensor: torch.Tensor) -> bool:
        """Whether ``tensor`` is the one saved under ``name``: a submodule the user replaced or
        added after the snapshot keeps its own values (its name may be an old one)."""
        return self.owners.get(name) is tensor if self.owners is not None else \
            name in self.params or name in self.buffers

    def restore(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        with torch.no_grad():
            for name, param in model.named_parameters():
                if not self._saved(name, param):
                    continue
                param.copy_(self.params[name])
                if name in self.opt_state:
                    optimizer.state[param] = clone_state(self.opt_state[name])
                else:
                    optimizer.state.pop(param, None)
            for name, buf in model.named_buffers():
                if name in self.buffers and self._saved(name, buf):
                    buf.copy_(self.buffers[name])
            for param, value, state in self.outside:
                param.copy_(value)
                if state is not None:
                    optimizer.state[param] = clone_state(state)
                else:
                    optimizer.state.pop(param, None)

    def swap_params(self, model: nn.Module) -> dict:
        """Put the saved parameter and buffer values in (for an evaluation of the model from
        before the cycle) and return the current ones, for :meth:`put_back`."""
        current = {n: t.detach().clone() for n, t in
                   [*model.named_parameters(), *model.named_buffers()]}
        current.update({i: p.detach().clone() for i, (p, _, _) in enumerate(self.outside)})
        with torch.no_grad():
            for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
                saved = self.params.get(name, self.buffers.get(name))
                if saved is not None:
                    tensor.copy_(saved)
            for param, value, _ in self.outside:    # a loss's own weights, as they were too
                param.copy_(value)
        return current

    def put_back(self, model: nn.Module, values: dict) -> None:
        with torch.no_grad():
            for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
                tensor.copy_(values[name])
            for i, (param, _, _) in enumerate(self.outside):
                param.copy_(values[i])

    def state_dict(self) -> dict:
        return {"params": self.params, "buffers": self.buffers, "opt_state": self.opt_state}

    @classmethod
    def from_state(cls, state: dict) -> Snapshot:
        return cls(state["params"], state["buffers"], state["opt_state"])


def trained_outside(model: nn.Module, optimizer: torch.optim.Optimizer) -> list:
    """The tensors the optimizer trains that are not the model's parameters (a loss's
    temperature or class weights): a closure reads them, so copies and restores must too."""
    inside = set(map(id, model.parameters()))
    return [p for g in optimizer.param_groups for p in g["params"] if id(p) not in inside]


def model_structure(model: nn.Module) -> tuple:
    """The identity of every submodule and Parameter, and every submodule's mode: it changes
    when the user replaces or adds a layer, or puts one in eval or training mode for the steps
    that follow (BatchNorm frozen for fine-tuning), which a traced graph (and an extension built
    on it, and plain training's copy beside it) would not follow.
    The two parts, (identities, modes), are compared apart where only one matters: a model
    put in eval mode before ``finish()`` still holds the cycle's layers."""
    modules = list(model.modules())
    return ((*map(id, modules), *map(id, model.parameters())),
            tuple(m.training for m in modules))
