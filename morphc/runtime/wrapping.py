"""torch.compile, DistributedDataParallel and a user's own wrapper around the module Bypass trains.

Bypass owns the wrapping, because every morph changes the module that has to be wrapped: the user's
model is compiled once, each extended graph once (the return phase changes s in place and never
recompiles), DDP is re-wrapped after each morph. Under torch.distributed every rank takes the same
decisions: the loss triggers see is the mean over ranks.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from morphc.errors import BypassError
from morphc.runtime.user_attributes import compiled_reads_user_model, ddp_reads_module


def unwrap(model: nn.Module) -> tuple[nn.Module, bool, bool]:
    """Accept a model the user already wrapped in DDP and/or ``torch.compile``."""
    ddp = compiled = False
    for _ in range(3):
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model, ddp = model.module, True
        elif hasattr(model, "_orig_mod") and type(model).__name__ == "OptimizedModule":
            model, compiled = model._orig_mod, True
    return model, ddp, compiled


class Wrapping:
    """Builds the module to call now from the user's model or the current extension."""

    def __init__(self, compile: bool, backend: Any, compile_options: Mapping | None, ddp: bool,
                 ddp_options: Mapping | None, wrap: Callable[[nn.Module], nn.Module] | None):
        self.compile, self.backend = bool(compile), backend
        self.compile_options = dict(compile_options or {})
        self.ddp, self.ddp_options, self.wrap = bool(ddp), dict(ddp_options or {}), wrap
        self._compiled_user: nn.Module | None = None

    def around(self, user_model: nn.Module, ext, compile: bool | None = None) -> nn.Module:
        """compile innermost, so DDP hooks stay in eager code; then DDP, then ``wrap``."""
        compile = self.compile if compile is None else compile
        if ext is not None:
            module = ext
            if compile:
                module = compiled_reads_user_model(torch.compile(
                    ext.graph_module, backend=self.backend, **self.compile_options), ext)
        else:
            module = user_model
            if compile:
                if self._compiled_user is None:
                    self._compiled_user = torch.compile(module, backend=self.backend,
                                                        **self.compile_options)
                module = self._compiled_user
        if self.ddp:
            module = ddp_reads_module(nn.parallel.DistributedDataParallel(
                module, **self.ddp_options))
        if self.wrap is not None:
            module = self.wrap(module)
        return module

    @property
    def compiled_user(self) -> nn.Module | None:
        """The compiled user's model :meth:`around` made (None before, or without compile):
        its hooks see the inputs the user's model gets, outside the compiled frame."""
        return self._compiled_user

    def around_copy(self, model: nn.Module) -> nn.Module:
        """A copy of the user's model (plain training beside a cycle) run as the user's model
        runs: compiled when it is (never in DDP: the copy trains on this rank alone). The
        user's ``wrap`` is not applied: it may hold on to the module it wrapped."""
        if not self.compile:
            return model
        return torch.compile(model, backend=self.backend, **self.compile_options)


def resolve_distributed(flag: bool | None) -> bool:
    """Agree across ranks on every decision iff a process group with > 1 rank is running."""
    running = torch.distributed.is_available() and torch.distributed.is_initialized() and \
        torch.distributed.get_world_size() > 1
    if flag and not running:
        raise BypassError("distributed=True but no torch.distributed process group with more "
                          "than one rank is initialised; call init_process_group first")
    return running if flag is None else bool(flag)


def all_reduce_mean(value: float, device: torch.device) -> float:
    """The mean loss over ranks: every rank's trigger sees the same number, and a NaN on any
    rank is a NaN on all (so all roll back together instead of deadlocking in backward)."""
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(tensor)
    return float(tensor) / torch.distributed.get_world_size()


def all_reduce_sum(values: list[float]) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64)
    torch.distributed.all_reduce(tensor)
    return [float(v) for v in tensor]


def all_reduce_grads(params: list[torch.Tensor]) -> None:
    """Average over ranks the gradients of tensors the optimizer trains outside the module DDP
    wraps: during a cycle DDP wraps the extended graph, which lacks the user's parameters the
    forward does not use (a loss's ``m.log_var``); outside one DDP averaged them, and ranks
    would drift apart. A gradient some rank lacks counts as zero there, as DDP counts it."""
    if not params:
        return
    world = torch.distributed.get_world_size()
    has = torch.tensor([p.grad is not None for p in params], dtype=torch.float64)
    torch.distributed.all_reduce(has)
    for param, count in zip(params, has.tolist(), strict=True):
        if count:
            if param.grad is None:
                param.grad = torch.zeros_like(param)
            torch.distributed.all_reduce(param.grad)
            param.grad.div_(world)
