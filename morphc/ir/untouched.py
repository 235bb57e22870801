"""Running the user's model without leaving a trace on it.

Probing a model — a shape-propagating forward, a trace, an escape score — must leave it as it
was: BatchNorm statistics, the RNG stream, and whatever a traced forward writes on its modules.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


@contextlib.contextmanager
def no_side_effects(module: nn.Module) -> Iterator[None]:
    """Run probe forwards without leaving a trace: buffers (BatchNorm statistics), the weights a
    forward rewrites in place (an embedding's ``max_norm``) and the RNG state are restored
    afterwards."""
    saved = {name: t.detach().clone() for name, t in [*module.named_buffers(),
                                                      *_rewritten_by_forward(module)]}
    with torch.random.fork_rng(devices=[]):
        try:
            yield
        finally:
            with torch.no_grad():
                for name, t in [*module.named_buffers(), *_rewritten_by_forward(module)]:
                    if name in saved:
                        t.copy_(saved[name])


def _rewritten_by_forward(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Parameters the forward itself writes in place: ``nn.Embedding(max_norm=...)`` renormalises
    the rows it looks up (``embedding_renorm_``), so a probe run would change the user's weights.
    Only these are copied: a copy of every weight would double a large model's memory."""
    return [(f"{name}.weight" if name else "weight", m.weight) for name, m in
            module.named_modules() if isinstance(m, nn.Embedding | nn.EmbeddingBag)
            and m.max_norm is not None and isinstance(m.weight, torch.Tensor)]


@contextlib.contextmanager
def attributes_kept(model: nn.Module) -> Iterator[None]:
    """Undo what a symbolic trace writes on the user's modules: a forward (or a pruning hook)
    that sets ``self.x = ...`` leaves a torch.fx Proxy there, and the tracer parks constants as
    ``_tensor_constant*`` on the root. Each module's attributes, parameters, buffers and
    children are put back as they were (the same objects). A ``torch.jit.script``-ed module
    keeps these in C++ (read-only views here) and is traced as a leaf, so it is skipped."""
    saved = [(m, dict(vars(m)), *(dict(getattr(m, d)) for d in _SLOTS)) for m in model.modules()
             if not isinstance(m, torch.jit.ScriptModule)]
    try:
        yield
    finally:
        for module, attributes, *slots in saved:
            for name in set(vars(module)) - set(attributes):
                del vars(module)[name]
            vars(module).update(attributes)
            for slot, values in zip(_SLOTS, slots, strict=True):
                getattr(module, slot).clear()
                getattr(module, slot).update(values)


_SLOTS = ("_parameters", "_buffers", "_modules")
