"""Plain training beside a trainer's cycle, so a cycle that does not pay costs no steps.

Without it a rollback restores the model from before the cycle while the trainer's step count
and LR schedule move on: the cycle's steps are lost (measured: a tiny BERT on a parity rule in
the HF Trainer ended with a higher training loss than without the callback on 4 of 5 seeds, by
up to 29 %; cycles kept for beating the loss from before them had been beaten by plain
training). ``morphc.Bypass`` keeps a copy of
the model (:mod:`~morphc.runtime.shadow`); a trainer owns the model object, its hooks and
wrappers, so here plain training's values live in tensors of their own and are swapped into the
user's Parameters only while plain training's step runs, on the same micro-batches the trainer
just used (replayed with their RNG state, so dropout draws what plain training would have).
A miss hands those values and the copy's optimizer state over: where plain training is now.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable

import torch
from torch import nn

from morphc.compiler.deviation import cuda_devices
from morphc.runtime.snapshot import trained_outside

# one micro-batch run again: returns (its loss, whether it is a share of the step's loss — or
# the int the trainer divides it by for its backward whatever the step's micro-batches, as
# Lightning divides by accumulate_grad_batches even in an epoch's shorter last step)
Replay = Callable[[object], tuple[torch.Tensor, bool | int]]


def copy_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The optimizer with its own state over the *same* Parameters, without its hooks (ours
    attach the extension; a scheduler's patched ``step`` counts the trainer's steps)."""
    hooks = {k: v for k, v in vars(optimizer).items()
             if k == "step" or (k.startswith("_optimizer_") and k.endswith("_hooks"))}
    memo = {id(p): p for g in optimizer.param_groups for p in g["params"]}
    for key, value in hooks.items():
        if key == "step":
            del optimizer.__dict__[key]
        else:
            setattr(optimizer, key, type(value)())
    try:
        return copy.deepcopy(optimizer, memo)
    finally:
        optimizer.__dict__.update(hooks)


class PlainBeside:
    """Plain training's parameters, buffers and optimizer state, stepped beside a cycle."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.params = [*model.parameters(), *trained_outside(model, optimizer)]
        self.buffers = list(model.buffers())
        with torch.no_grad():
            self.values = [p.detach().clone() for p in self.params]
            self.buffer_values = [b.detach().clone() for b in self.buffers]
        self.optimizer = copy_optimizer(optimizer)
        self.devices = cuda_devices(model)
        self.losses: list[float] = []       # plain training's loss per optimizer step

    def rng_state(self) -> tuple:
        """The RNG state a micro-batch is about to draw from (replayed with it)."""
        return (torch.get_rng_state(),
                [torch.cuda.get_rng_state(d) for d in self.devices])

    @contextlib.contextmanager
    def _swapped_in(self):
        """Plain training's values in the user's tensors (their own and their gradients put
        back afterwards, whatever happens)."""
        with torch.no_grad():
            kept = [p.detach().clone() for p in self.params]
            kept_buffers = [b.detach().clone() for b in self.buffers]
            for p, v in zip(self.params, self.values, strict=True):
                p.copy_(v)
            for b, v in zip(self.buffers, self.buffer_values, strict=True):
                b.copy_(v)
        grads = [p.grad for p in self.params]
        for p in self.params:
            p.grad = None
        try:
            yield
        finally:
            with torch.no_grad():
                for p, v in zip(self.params, kept, strict=True):
                    p.copy_(v)
                for b, v in zip(self.buffers, kept_buffers, strict=True):
                    b.copy_(v)
            for p, g in zip(self.params, grads, strict=True):
                p.grad = g

    def step(self, micro_batches: list, replay: Replay, groups: list[dict],
             clip: Callable[[], None]) -> float:
        """Plain training's optimizer step on the trainer's micro-batches (``(rng state,
        inputs)`` each), with the hyperparameters the trainer's groups had for it (``groups``,
        read before its step) and its clipping (``clip()``, over the gradients left in the
        user's tensors). A non-finite loss or gradient skips the step,
        as it would spoil plain training. Returns the step's loss (inf: skipped)."""
        losses, shares = [], []
        with self._swapped_in(), torch.random.fork_rng(devices=self.devices):
            for (cpu, cudas), inputs in micro_batches:
                torch.set_rng_state(cpu)
                for device, state in zip(self.devices, cudas, strict=True):
                    torch.cuda.set_rng_state(state, device)
                loss, share = replay(inputs)
                shares.append(share is True)
                losses.append(float(loss.detach()))
                divisor = share if type(share) is int else 1 if share else len(micro_batches)
                (loss if divisor == 1 else loss / divisor).backward()
            value = sum(losses) if all(shares) else sum(losses) / max(len(losses), 1)
            finite = math.isfinite(value) and all(
                p.grad is None or bool(torch.isfinite(p.grad).all()) for p in self.params)
            if finite:
                clip()
                for group, mine in zip(groups, self.optimizer.param_groups, strict=False):
                    mine.update((k, v) for k, v in group.items() if k != "params")
                self.optimizer.step()
            with torch.no_grad():
                for p, v in zip(self.params, self.values, strict=True):
                    v.copy_(p)
                for b, v in zip(self.buffers, self.buffer_values, strict=True):
                    v.copy_(b)
        value = value if finite else math.inf
        self.losses.append(value)
        return value

    def hand_over(self, optimizer: torch.optim.Optimizer) -> None:
        """Plain training's state into the user's own tensors and optimizer."""
        with torch.no_grad():
            for p, v in zip(self.params, self.values, strict=True):
                p.copy_(v)
                if p in self.optimizer.state:
                    optimizer.state[p] = self.optimizer.state.pop(p)
                else:
                    optimizer.state.pop(p, None)
            for b, v in zip(self.buffers, self.buffer_values, strict=True):
                b.copy_(v)
