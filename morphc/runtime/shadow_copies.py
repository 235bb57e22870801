"""What plain training's copy beside a cycle is made of, beyond ``copy.deepcopy``: the user's
gradient and optimizer step hooks (deepcopy drops them), Parameters a scripted submodule copies
unrecorded, tensors that join the optimizer mid-cycle, and the per-parameter optimizer state
shown in the user's optimizer between steps. Split from :mod:`morphc.runtime.shadow`, which
decides when the copy steps and when it is handed over."""

from __future__ import annotations

import torch
from torch import nn


def copy_grad_hooks(pairs) -> None:
    """Register each user tensor's gradient hooks (``param.register_hook``: a pruning mask,
    per-element clipping) on its copy: deepcopy drops them, and the copy would not train as
    plain training does — a hand-over would grow pruned weights back."""
    for param, mine in pairs:
        present = {id(hook) for hook in (mine._backward_hooks or {}).values()}
        for hook in (param._backward_hooks or {}).values():
            if id(hook) not in present:
                mine.register_hook(hook)


def copy_step_hooks(optimizer: torch.optim.Optimizer, mine: torch.optim.Optimizer) -> None:
    """Register the user's optimizer step hooks (``register_step_pre_hook`` /
    ``register_step_post_hook``: a projection onto non-negative weights over
    ``optimizer.param_groups``) on the copy too: deepcopy drops them, and the copy would step
    as plain training does not — a hand-over would give weights the hook never projected."""
    for name in ("_optimizer_step_pre_hooks", "_optimizer_step_post_hooks"):
        getattr(mine, name).update(getattr(optimizer, name, {}))


def copied_parameters(model: nn.Module, copied: nn.Module, memo: dict) -> None:
    """Enter each copied Parameter in ``memo`` by name: a ``torch.jit.script``-ed submodule
    copies its tensors in C++ without recording them, and the optimizer's copy would then step
    fresh tensors of its own that the copied model never reads."""
    for (_, param), (_, mine) in zip(model.named_parameters(remove_duplicate=False),
                                     copied.named_parameters(remove_duplicate=False),
                                     strict=True):
        memo.setdefault(id(param), mine)


def copied_tensor(param: torch.Tensor) -> torch.Tensor:
    """A copy of ``param`` to train plainly: the same value, kind and ``requires_grad``, no
    gradient and no hooks (:func:`copy_grad_hooks` adds the user's)."""
    with torch.no_grad():
        mine = param.detach().clone()
    if isinstance(param, nn.Parameter):
        return nn.Parameter(mine, requires_grad=param.requires_grad)
    return mine.requires_grad_(param.requires_grad)


def put_state(state: dict, param: torch.Tensor, value: dict | None) -> None:
    """One parameter's optimizer state set (in place of the old entry: the order of
    ``optimizer.state`` is kept), or removed for None."""
    if value is None:
        state.pop(param, None)
    else:
        state[param] = value


def swap_states(state: dict, pairs, mine: dict) -> list[dict | None]:
    """The copy's per-parameter optimizer state shown in the user's optimizer (the same dict
    objects: nothing steps between steps); returns what it held, for :meth:`Shadow.show_run`."""
    held = [state.get(param) for param, _ in pairs]
    for param, copy_of in pairs:
        put_state(state, param, mine.get(copy_of))
    return held
