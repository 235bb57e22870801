"""``sites="auto"``: rank sites by what a short joint look-ahead keeps at s = 0.

Why not ``‖∂L/∂B‖`` at B = 0 (:func:`~morphc.compiler.escape.escape_scores`): it measures how fast
the *extended* model could move, and on the symmetric saddle it picks the layer whose gain the
return loses. What a cycle keeps is the model at s = 0, so each candidate site gets a few steps
of the cycle's own joint free phase (``L(s=1) + L(s=0)``), alone and from the same point, and is
scored by how much the loss of its s = 0 model dropped. After each trial the user's weights,
buffers and optimizer state are restored bit for bit (the same :class:`Snapshot` a rollback uses).

Cost: ``2 · steps`` forward/backward passes per candidate site; on a model with many sites, name
the layers instead.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from morphc.runtime.optimizer_group import ExtensionGroup
from morphc.runtime.snapshot import Snapshot
from morphc.runtime.steps import add_back, loss_of, set_aside

Closure = Callable[[nn.Module], torch.Tensor]


def lookahead_scores(extend_site: Callable[[str], nn.Module], names: list[str],
                     optimizer: torch.optim.Optimizer, user_model: nn.Module, closure: Closure,
                     evaluate: Callable[[nn.Module], float], *, steps: int,
                     group_options: dict,
                     reduce: Callable[[float], float] = float) -> dict[str, float]:
    """Per site: loss of the model before, minus the loss of the s = 0 model after ``steps``
    joint steps with a bypass at that site only (higher is better; a trial whose loss went
    non-finite on any rank scores −inf). ``extend_site(name)`` builds the one-site extension;
    ``evaluate`` measures on this rank, ``reduce`` agrees across ranks (a mean, inf-preserving)."""
    snapshot = Snapshot.take(user_model, optimizer)
    before = reduce(evaluate(user_model))
    scores: dict[str, float] = {}
    for name in names:
        ext = extend_site(name)
        group = ExtensionGroup(optimizer, list(ext.extension_parameters()), group_options)
        try:
            after = reduce(_trial(ext, optimizer, group, closure, evaluate, steps))
        finally:
            snapshot.restore(user_model, optimizer)
        scores[name] = before - after if math.isfinite(after) else -math.inf
    return scores


def _trial(ext, optimizer, group: ExtensionGroup, closure: Closure,
           evaluate: Callable[[nn.Module], float], steps: int) -> float:
    """The loss of the s = 0 model after ``steps`` joint steps (inf if a loss went non-finite);
    every rank returns from every trial, so the caller's reduce is reached by all."""
    diverged = False
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        group.zero_grad()
        params = [p for g in optimizer.param_groups for p in g["params"]] + group.params
        grads = None
        for s in (0.0, 1.0):
            ext.set_homotopy(s)
            loss, value = loss_of(closure, ext)
            if not math.isfinite(value):
                diverged = True
                break
            loss.backward()
            if grads is None:                  # safe from a closure's zero_grad()
                grads = set_aside(params)
        if diverged:
            break
        add_back(params, grads)
        group.step()
    if diverged:
        return math.inf
    ext.set_homotopy(0.0)
    return evaluate(ext)
