"""What the user does to their model and optimizer between ``bp.step`` calls, as Bypass sees it.

In-place edits of weights and buffers are seen by version counters (:func:`edited_since`); loads
into the model or the optimizer resolve a cycle or probation in flight first
(:class:`ResolveBeforeLoad`), as ``bp.finish()`` does, so resolving it later cannot hand plain
training's state, or the state from before the cycle, over what was loaded.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn


def weight_versions(model: nn.Module) -> list[tuple[torch.Tensor, int]]:
    """Each parameter with its in-place version counter, at the end of a step."""
    return [(p, p._version) for p in model.parameters()]


def buffer_versions(model: nn.Module) -> list[tuple[torch.Tensor, int]]:
    """Each buffer with its version counter: a forward in training mode between steps (a
    metric without ``model.eval()``) moves BatchNorm's statistics."""
    return [(b, b._version) for b in model.buffers()]


EDITED = ("the model's weights were changed between bp.step calls while plain training ran "
          "beside a kept cycle's run (its probation: a clamp, a projection, a copy_ into a "
          "weight): plain training cannot follow such edits, so the probation ends here and "
          "your run is kept. To keep the guarantee, constrain weights inside the model "
          "(torch.nn.utils.parametrize) instead of editing them after a step")
BUFFERS_MOVED = ("the model ran in training mode between bp.step calls while plain training ran "
                 "beside a kept cycle's run (its probation), and moved its buffers (BatchNorm "
                 "statistics): plain training's copy never sees that forward, so a hand-over "
                 "gives statistics without it. Evaluate under model.eval() (torch.no_grad() "
                 "alone does not keep BatchNorm from updating)")


class ResolveBeforeLoad:
    """A ``load_state_dict`` pre-hook on the user's model: weights loaded mid-cycle or on
    probation (early stopping restoring its best state, a checkpoint) first resolve what is in
    flight, as ``bp.finish()`` does — else resolving it later (the next step, ``finish``) hands
    plain training's state, or the state from before the cycle, over what was loaded. Holds
    Bypass weakly; a copy of the model (deepcopy, an EMA) keeps it but is not the model it
    watches, and a pickled model takes an inert one."""

    def __init__(self, bypass=None) -> None:
        self.ref = None if bypass is None else weakref.ref(bypass)

    @classmethod
    def on(cls, bypass, model: nn.Module) -> list:
        """Hooked on every submodule (the handles): torch runs a load's hooks from the module
        it is called on down, and a load into one layer is a load too. A torch.jit.script-ed
        submodule takes no hooks; a load through its parents still reaches theirs."""
        hook = cls(bypass)
        return [m.register_load_state_dict_pre_hook(hook) for m in model.modules()
                if not isinstance(m, torch.jit.ScriptModule)]

    def __call__(self, module, state_dict, prefix, *args) -> None:
        bypass = None if self.ref is None else self.ref()   # acts once, where the load began:
        if bypass is not None and not prefix and \
                any(module is m for m in bypass._user_model.modules()):   # not on a copy
            bypass._before_load()

    def __deepcopy__(self, memo):
        return self

    def __reduce__(self):
        return ResolveBeforeLoad, ()


def edited_since(versions: list[tuple[torch.Tensor, int]] | None) -> bool:
    """Whether the user changed weights in place since :func:`weight_versions` (a clamp or a
    projection after each step, a copy_ into a weight): plain training beside the run never got
    that edit, so handing its state over would undo it (buffers: :func:`buffer_versions`)."""
    return versions is not None and any(p._version != v for p, v in versions)


class ResolveBeforeOptimizerLoad(ResolveBeforeLoad):
    """The same, as a ``load_state_dict`` pre-hook on the user's optimizer: a checkpoint's
    optimizer state loaded mid-cycle (resuming, or restoring a best state — often before the
    model's) would be set aside with plain training's values between steps, then undone by the
    cycle's verdict. Acts only on the optimizer Bypass drives (plain training's copy of it
    carries the hook too)."""

    @classmethod
    def on(cls, bypass, optimizer: torch.optim.Optimizer) -> list:
        return [optimizer.register_load_state_dict_pre_hook(cls(bypass))]

    def __call__(self, optimizer, state_dict) -> None:
        bypass = None if self.ref is None else self.ref()
        if bypass is not None and optimizer is bypass.optimizer and not bypass._loading:
            bypass._before_load()

    def __reduce__(self):
        return ResolveBeforeOptimizerLoad, ()


class WarnHalfCheckpoint(ResolveBeforeLoad):
    """A ``state_dict`` pre-hook on the user's model: without plain training beside a cycle
    (``shadow=False``, DDP) its tensors hold, mid-cycle, the cycle's weights without the
    branches' share — a checkpoint of them is neither plain training nor the cycle's model."""

    @classmethod
    def on(cls, bypass, model: nn.Module) -> list:
        return [model.register_state_dict_pre_hook(cls(bypass))]

    def __call__(self, module, prefix, keep_vars) -> None:
        bypass = None if self.ref is None else self.ref()
        if bypass is not None and module is bypass._user_model:
            bypass._state_dict_taken()

    def __reduce__(self):
        return WarnHalfCheckpoint, ()


HALF_CHECKPOINT = ("model.state_dict() was taken mid-cycle without plain training beside it "
                   "(shadow=False, or DDP): your model's weights lack the extension's share "
                   "until the cycle folds, so this checkpoint is neither plain training nor the "
                   "cycle's model. Save bp.state_dict() to resume mid-cycle, or checkpoint "
                   "when bp.phase == 'train' (after bp.finish() at the end)")
