"""How far two models' outputs are apart, measured without leaving a trace on either.

Every deviation morphc reports (E1, C1, a snap onto C, a model-space move, a graph diff) is
``relative_deviation`` of two ``deterministic_forward`` runs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from morphc.ir.untouched import no_side_effects


def relative_deviation(reference, other) -> float:
    """``max|a − b| / max|a|`` over all tensor outputs (0 when equal). NaN anywhere makes it NaN
    (``max`` would ignore it), so a check ``not deviation <= tol`` refuses it."""
    ref = [t for t in torch.utils._pytree.tree_leaves(reference) if isinstance(t, torch.Tensor)]
    out = [t for t in torch.utils._pytree.tree_leaves(other) if isinstance(t, torch.Tensor)]
    worst = 0.0
    for a, b in zip(ref, out, strict=True):
        if not a.numel():
            continue
        a64, b64 = a.detach().to(torch.float64), b.detach().to(torch.float64)
        if not (torch.isfinite(a64).all() and torch.isfinite(b64).all()):
            if torch.equal(a64.nan_to_num(), b64.nan_to_num()) and \
                    torch.equal(a64.isnan(), b64.isnan()):
                continue     # the same non-finite values on both sides: no deviation
            return float("nan")
        scale, diff = float(a64.abs().max()), float((a64 - b64).abs().max())
        worst = max(worst, diff / scale if scale > 0 else diff)
    return worst


def cuda_devices(module: nn.Module, inputs=()) -> list[int]:
    """The CUDA devices ``module`` and ``inputs`` live on: whose RNGs a fork must cover."""
    tensors = [*module.parameters(), *module.buffers(),
               *(t for t in torch.utils._pytree.tree_leaves(inputs) if isinstance(t, torch.Tensor))]
    return sorted({t.device.index or 0 for t in tensors if t.device.type == "cuda"})


@contextlib.contextmanager
def deterministic(guard: nn.Module, inputs=()) -> Iterator[None]:
    """no_grad, the RNG fixed (dropout draws the same masks in two runs being compared) and
    restored afterwards — on the devices involved only, no global RNG is ever reseeded — and the
    buffers of ``guard`` (BatchNorm statistics) restored."""
    devices = cuda_devices(guard, inputs)
    with no_side_effects(guard), torch.random.fork_rng(devices=devices), torch.no_grad():
        torch.default_generator.manual_seed(0)
        for index in devices:
            torch.cuda.default_generators[index].manual_seed(0)
        yield


def deterministic_forward(module: nn.Module, inputs: tuple, guard: nn.Module | None = None,
                          kwargs: dict | None = None):
    """``module(*inputs, **kwargs)`` under :func:`deterministic` (``guard`` defaults to it)."""
    with deterministic(guard if guard is not None else module, (inputs, kwargs)):
        return module(*inputs, **(kwargs or {}))
