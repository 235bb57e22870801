"""Buffers of modules a closure runs outside the model Bypass trains.

A closure may run modules Bypass does not hold: a head with BatchNorm beside a Bypass over the
backbone, a GAN's discriminator (with its BatchNorm) in the generator's loss. Plain training
calls the closure once a step and moves their statistics once. During a cycle morphc calls it
more often — plain training's copy, the extended model at s = 0 and at s = 1, the verdicts — and
each call moved them again: a DCGAN discriminator's statistics drifted from plain training's
although no generator cycle paid. So every call but the one that stands for plain training's
step leaves them as it found them.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch
from torch import nn
from torch.nn.modules.module import register_module_forward_pre_hook


@contextlib.contextmanager
def outside_buffers_kept(*roots: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Put back, after the block (forward and backward: autograd may have saved them), the
    buffers of every module run in it that is none of ``roots``' modules (whose buffers the
    caller handles). Found by a global forward pre-hook held only for the block, which answers
    this thread's calls only (a model another thread runs meanwhile is not the closure's); off
    when ``enabled`` is False (torch.compile would trace the hook into its graphs)."""
    if not enabled:
        yield
        return
    seen = {id(m) for root in roots for m in root.modules()}
    saved: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    owner = threading.get_ident()

    def record(module: nn.Module, args) -> None:
        if id(module) in seen or threading.get_ident() != owner:
            return
        seen.add(id(module))
        for buf in module.buffers(recurse=False):
            saved.setdefault(id(buf), (buf, buf.detach().clone()))

    handle = register_module_forward_pre_hook(record)
    try:
        yield
    finally:
        handle.remove()
        with torch.no_grad():
            for buf, value in saved.values():
                buf.copy_(value)
