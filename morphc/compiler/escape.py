"""Escape scores: how strongly a bypass at each site could move the loss, ``‖∂L/∂B‖`` at B = 0.

At a stationary point of the original model ``∂L/∂W = Σ δ xᵀ = 0``, yet
``∂L/∂B = Σ δ ρ(Ax + a)ᵀ`` is non-zero when ρ is non-linear: that is the escape direction.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from morphc.errors import SiteError
from morphc.ir.untouched import no_side_effects

Probe = Callable[[nn.Module], torch.Tensor]


def random_direction_probe(example_inputs: tuple, seed: int = 0,
                           kwargs: dict | None = None) -> Probe:
    """Fallback when no probe is given: ``L = ⟨f(x), R⟩`` for a fixed random direction R.

    It ranks sites by how strongly a bypass there can move the output at all — a proxy for
    the escape signal when no loss is known.
    """
    def probe(module: nn.Module) -> torch.Tensor:
        out = module(*example_inputs, **(kwargs or {}))
        tensors = [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)
                   and t.is_floating_point()]
        gen = torch.Generator().manual_seed(seed)
        return sum((t * torch.randn(t.shape, generator=gen, dtype=t.dtype).to(t.device)).sum()
                   for t in tensors)
    return probe


def escape_scores(ext, probe: Probe | None = None) -> dict[str, float]:
    """``‖∂L/∂B‖`` per site of an extended model, without touching ``.grad`` or BN statistics."""
    probe = probe or random_direction_probe(ext.extension_traced.example_inputs,
                                            kwargs=ext.extension_traced.example_kwargs)
    names = list(ext.extension_branches)
    with no_side_effects(ext):
        loss = probe(ext)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1 or not loss.requires_grad:
            raise SiteError(f"an escape-score probe must return a scalar loss tensor with "
                            f"autograd on, as probe(module) -> loss_fn(module(x), y); got "
                            f"{loss!r:.80}")
        grads = torch.autograd.grad(loss, [ext.extension_branches[n].B for n in names],
                                    allow_unused=True)
    return {n: (float(g.norm()) if g is not None else 0.0) for n, g in zip(names, grads,
                                                                            strict=True)}


def rank_sites(scores: dict[str, float], top_k: int | None = None) -> list[str]:
    """The ``top_k`` best-scoring site names (default: half, at least one), in graph order."""
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int)
                              or top_k < 1):
        raise SiteError(f"top_k must be an int >= 1 (or None: half the sites), got {top_k!r}")
    names = list(scores)
    keep = top_k or max(1, math.ceil(len(names) / 2))
    best = set(sorted(names, key=lambda n: -scores[n])[:keep])
    return [n for n in names if n in best]
