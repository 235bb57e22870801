"""``morphc.Bypass``: escape stagnation inside the user's own training loop.

The pipeline, repeatable any number of times::

    train ──trigger──▶ extend ──▶ bypass phase ──▶ return phase ──▶ contract ──▶ train …

- **train**: plain training of the user's model; the trigger watches every step.
- **extend**: ``morphc.extend`` adds bypass branches (B = 0, so nothing changes); their parameters
  join the optimizer in their own param group. The user's parameters keep their optimizer state.
- **bypass**: free training of the extended model for ``bypass_steps`` steps.
- **return**: ``anneal`` drives the homotopy s from 1 to exactly 0 while training continues;
  ``penalty`` adds a growing penalty on the constraint residual and snaps onto C at the end.
- **contract**: ``morphc.contract`` folds the branches into the user's own Parameters, in place;
  the extension's param group and state leave the optimizer.

Anything that goes wrong during a cycle (a non-finite loss, a failing pass, a contraction that
cannot be made exact) restores the pre-extension weights, buffers and optimizer state; then
training carries on (``on_failure="rollback"``) or a :class:`~morphc.BypassError` is raised
(``on_failure="raise"``). Nothing is silently corrupted.

>>> import torch, torch.nn.functional as F, morphc
>>> model = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
>>> x, y = torch.randn(32, 3), torch.randn(32, 1)
>>> bp = morphc.Bypass(model, lambda p: torch.optim.Adam(p, lr=1e-2),
...                    trigger=morphc.Schedule(every=5), bypass_steps=5, return_steps=5,
...                    sites="all", verbose=False)
>>> for _ in range(20):
...     loss = bp.step(lambda m: F.mse_loss(m(x), y))
>>> bp.finish() is model
True
"""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from morphc.compiler.contract import contract
from morphc.compiler.escape import escape_scores, random_direction_probe
from morphc.compiler.extend import extend
from morphc.compiler.extended import ExtendedModel
from morphc.errors import BypassError, MorphcError
from morphc.ir.trace import TracedModel, trace
from morphc.runtime.triggers import Plateau, Trigger

logger = logging.getLogger("morphc.bypass")

Closure = Callable[[nn.Module], torch.Tensor]
OptimizerFactory = Callable[[list[nn.Parameter]], torch.optim.Optimizer]

RETURN_MODES = ("anneal", "penalty")
FAILURE_MODES = ("rollback", "raise")
STATE_VERSION = 1


# -- pure helpers ------------------------------------------------------------------------------
def _clone_state(state: Mapping) -> dict:
    """A deep copy of one parameter's optimizer state (tensors cloned, numbers kept)."""
    return {k: (v.detach().clone() if isinstance(v, torch.Tensor) else v)
            for k, v in state.items()}


def _plain(value):
    """Make an event field checkpoint-safe (``torch.load(weights_only=True)``)."""
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _unwrap(model: nn.Module) -> tuple[nn.Module, bool, bool]:
    """Accept a model the user already wrapped in DDP and/or ``torch.compile``: Bypass must own
    the wrapping, because every morph changes the module that has to be wrapped."""
    ddp = compiled = False
    for _ in range(3):
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model, ddp = model.module, True
        elif hasattr(model, "_orig_mod") and type(model).__name__ == "OptimizedModule":
            model, compiled = model._orig_mod, True
    return model, ddp, compiled


class _NonFiniteLoss(Exception):
    """Internal: the loss of a bypass/return step was NaN/Inf (handled by a rollback)."""

    def __init__(self, value: float) -> None:
        super().__init__(value)
        self.value = value


class _Snapshot:
    """What a rollback restores: the user's parameters, buffers and their optimizer state, as
    they were right before an extension. Kept by name, so it survives a checkpoint."""

    def __init__(self, params: dict, buffers: dict, opt_state: dict) -> None:
        self.params, self.buffers, self.opt_state = params, buffers, opt_state

    @classmethod
    def take(cls, model: nn.Module, optimizer: torch.optim.Optimizer) -> _Snapshot:
        named = dict(model.named_parameters())
        params = {n: p.detach().clone() for n, p in named.items()}
        buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
        opt_state = {n: _clone_state(optimizer.state[p]) for n, p in named.items()
                     if p in optimizer.state}
        return cls(params, buffers, opt_state)

    def restore(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Write the saved values back into the *same* tensors (the optimizer and any compiled
        graph keep pointing at them)."""
        with torch.no_grad():
            for name, param in model.named_parameters():
                param.copy_(self.params[name])
                if name in self.opt_state:
                    optimizer.state[param] = _clone_state(self.opt_state[name])
                else:
                    optimizer.state.pop(param, None)
            for name, buf in model.named_buffers():
                if name in self.buffers:
                    buf.copy_(self.buffers[name])

    def state_dict(self) -> dict:
        return {"params": self.params, "buffers": self.buffers, "opt_state": self.opt_state}

    @classmethod
    def from_state(cls, state: dict) -> _Snapshot:
        return cls(state["params"], state["buffers"], state["opt_state"])


class _ExtensionGroup:
    """The extension's param group of the user's optimizer, attached only while it steps.

    ``add_param_group`` validates the group and fills in the optimizer's defaults once; then
    the group and its state live here and join ``optimizer.param_groups`` / ``optimizer.state``
    for the duration of each ``optimizer.step()``. Between steps the user's optimizer looks
    exactly as they built it, which matters because torch 2.13's LambdaLR, MultiplicativeLR,
    CyclicLR, CosineAnnealingWarmRestarts and SequentialLR zip their per-group lists *strictly*
    against ``param_groups`` (a permanently added group crashes ``scheduler.step()``), and because
    a user's own ``optimizer.state_dict()`` must keep loading into a fresh optimizer.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, params: list[nn.Parameter],
                 options: Mapping) -> None:
        group = {k: v for k, v in optimizer.param_groups[0].items() if k != "params"}
        if "weight_decay" in group:
            group["weight_decay"] = 0.0   # decay is no path to C: the return phase is
        group.update(options)
        group["params"] = params
        optimizer.add_param_group(group)
        self.group = optimizer.param_groups.pop()
        self.optimizer, self.state = optimizer, {}

    @property
    def params(self) -> list[nn.Parameter]:
        return self.group["params"]

    def step(self) -> None:
        """``optimizer.step()`` over the user's groups and this one, in one call."""
        groups, state = self.optimizer.param_groups, self.optimizer.state
        groups.append(self.group)
        state.update(self.state)
        try:
            self.optimizer.step()
        finally:
            groups[:] = [g for g in groups if g is not self.group]
            self.state = {p: state.pop(p) for p in self.params if p in state}

    def zero_grad(self) -> None:
        for param in self.params:
            param.grad = None

    def state_dict(self, names: Mapping[nn.Parameter, str]) -> dict:
        return {"group": {k: v for k, v in self.group.items() if k != "params"},
                "state": {names[p]: _clone_state(s) for p, s in self.state.items()}}

    def load_state_dict(self, state: dict, params: Mapping[str, nn.Parameter]) -> None:
        self.group.update(state["group"])
        self.state = {params[n]: _clone_state(s) for n, s in state["state"].items()}


class Bypass:
    """Train ``model`` as usual; when training stagnates, extend, train, return and contract.

    >>> bp = Bypass(model, lambda params: torch.optim.Adam(params, lr=1e-3))   # doctest: +SKIP
    >>> for x, y in loader:                                                     # doctest: +SKIP
    ...     loss = bp.step(lambda m: F.cross_entropy(m(x), y))
    >>> model = bp.finish()                                                     # doctest: +SKIP

    **Optimizer.** ``optimizer`` is a factory ``params -> torch.optim.Optimizer`` (called once,
    with the user's parameters) or an optimizer already built over them (then drive your LR
    scheduler on it as usual). It is the one optimizer of the whole run and any ``torch.optim``
    optimizer whose ``step()`` needs no closure works. The user's parameters keep their state
    (momentum, Adam moments, step counts) through every cycle; extension parameters form their
    own param group (group 0's settings, ``weight_decay=0``, then ``extension_options``), stepped
    by the same ``optimizer.step()`` call; its lr follows group 0's lr × ``extension_lr_scale``
    unless ``extension_options`` fixes ``lr``. See :class:`_ExtensionGroup` for why the group is
    attached only during the step.

    **When.** ``trigger`` (default ``Plateau()``: smoothed loss improved < 0.1 % over 100
    steps) is consulted on every normal step; ``max_cycles`` caps the cycles.

    **Where.** ``sites`` (default ``"all"``) goes to ``morphc.extend``, with ``width``,
    ``activation``, ``exclude``, ``overrides``, ``init_scale``. ``"all"`` is the default because
    the escape score behind ``"auto"`` (‖∂L/∂B‖ on ``probe``: ``"closure"`` = the current
    step's closure, ``None`` = a random output direction, or a ``probe(module) -> loss``; the
    ``top_k`` best kept, default half) measures how fast a branch lowers the loss, not whether
    the escape survives contraction: on the symmetric teacher–student saddle it picks the first
    layer, whose branch keeps the hidden units identical, while the layer after them is the
    one that breaks the tie (examples/README.md has the numbers).

    **How long, and back.** ``bypass_steps`` of free training, then ``return_steps`` of
    ``return_mode``: ``"anneal"`` drives the homotopy s linearly from 1 to exactly 0 (the last
    return step already trains on C; contraction is exact) — ``"penalty"`` adds
    ``penalty·(i/N)²·Σ‖α − α_C(α)‖²`` to the loss and snaps onto C at the end, recording the
    snap's function change in ``history`` (``max_snap_change`` rolls back larger snaps).

    **Failures.** A non-finite loss or an exception of the extended model during a cycle, a
    failing pass or contraction restore the user's weights, buffers and optimizer state to
    their values before the extension (a cycle keeps one copy of them for that); then training
    carries on (``on_failure="rollback"``) or :class:`~morphc.BypassError` is raised
    (``"raise"``). The next extension after a rollback draws new branch values.

    **Wrapping.** ``compile=True`` compiles the user's model once and each extended graph once
    (``compile_backend``, ``compile_options``); the return phase changes s in place and never
    recompiles. ``ddp=True`` wraps the current module in ``DistributedDataParallel``
    (``ddp_options``), re-wrapped after each morph; ``wrap`` is any other ``module -> module``.
    Under ``torch.distributed`` (auto-detected, or ``distributed=``), the loss seen by triggers
    is the mean over ranks and escape scores are summed over ranks, so every rank takes the
    same decisions; extensions are seeded by ``seed`` and the cycle number.

    **Inputs.** Tracing needs example inputs: captured from the model's first call in the first
    ``step`` (a forward pre-hook), or given as ``example_inputs``.

    **Visible.** ``history`` lists every event (``extend``, ``return``, ``contract``,
    ``rollback``, ``failure``) with step, phase, cycle, loss, residual, sites, snap change or
    reason; each is also a log line on the ``morphc.bypass`` logger, printed to stderr when
    ``verbose`` and logging is not set up to show it.
    """

    def __init__(self, model: nn.Module,
                 optimizer: OptimizerFactory | torch.optim.Optimizer,
                 trigger: Trigger | None = None, *, bypass_steps: int = 100,
                 return_steps: int = 100, return_mode: str = "anneal",
                 sites: Any = "all", width: int | float = 8, activation: str = "tanh",
                 top_k: int | None = None, exclude: Iterable[str] = (),
                 overrides: Mapping[str, Mapping] | None = None,
                 probe: Closure | str | None = "closure", example_inputs=None, seed: int = 0,
                 init_scale: float = 1.0, extension_options: Mapping | None = None,
                 extension_lr_scale: float = 1.0, penalty: float = 10.0,
                 max_snap_change: float | None = None, max_cycles: int | None = None,
                 on_failure: str = "rollback", max_grad_norm: float | None = None,
                 compile: bool = False, compile_backend: Any = "inductor",
                 compile_options: Mapping | None = None, ddp: bool = False,
                 ddp_options: Mapping | None = None,
                 wrap: Callable[[nn.Module], nn.Module] | None = None,
                 distributed: bool | None = None, verbose: bool = True) -> None:
        model, was_ddp, was_compiled = _unwrap(model)
        _check_choice("return_mode", return_mode, RETURN_MODES)
        _check_choice("on_failure", on_failure, FAILURE_MODES)
        if bypass_steps < 0 or return_steps < 0:
            raise BypassError("bypass_steps and return_steps must be >= 0")
        self._user_model = model
        self.optimizer = _make_optimizer(model, optimizer)
        self.trigger = trigger if trigger is not None else Plateau()
        self.bypass_steps, self.return_steps = int(bypass_steps), int(return_steps)
        self.return_mode, self.on_failure = return_mode, on_failure
        self.extend_options = dict(sites=sites, width=width, activation=activation,
                                   exclude=tuple(exclude), overrides=overrides,
                                   init_scale=init_scale)
        self.top_k, self.probe, self.seed = top_k, probe, int(seed)
        self.extension_options = dict(extension_options or {})
        self.extension_lr_scale = float(extension_lr_scale)
        self.penalty, self.max_snap_change = float(penalty), max_snap_change
        self.max_cycles, self.max_grad_norm = max_cycles, max_grad_norm
        self.compile, self.compile_backend = bool(compile or was_compiled), compile_backend
        self.compile_options = dict(compile_options or {})
        self.ddp, self.ddp_options, self.wrap = bool(ddp or was_ddp), dict(ddp_options or {}), wrap
        self.distributed = _resolve_distributed(distributed)
        self.verbose = verbose
        self.example_inputs = None if example_inputs is None else _as_tuple(example_inputs)
        self.history: list[dict] = []
        self._traced: TracedModel | None = None
        self._ext: ExtendedModel | None = None
        self._group: _ExtensionGroup | None = None
        self._snapshot: _Snapshot | None = None
        self._last_closure: Closure | None = None
        self._last_loss: float | None = None
        self._compiled_user: nn.Module | None = None
        self._module: nn.Module | None = None
        self.phase, self.step_count, self.phase_step, self.cycle, self.failures = \
            "train", 0, 0, 0, 0
        self._return_from, self._return_len = 1.0, self.return_steps

    # -- what the user calls -----------------------------------------------------------------
    @property
    def model(self) -> nn.Module:
        """The module to call right now: the extended model during a cycle, else the user's
        model (wrapped in DDP / compiled when asked)."""
        if self._module is None:
            self._module = self._wrap_current()
        return self._module

    @property
    def extended(self) -> ExtendedModel | None:
        """The current ``ExtendedModel`` (None outside a cycle)."""
        return self._ext

    def step(self, closure: Closure) -> torch.Tensor:
        """One training step: zero_grad, ``closure(bp.model)``, backward, optimizer step, then
        whatever morph is due. Returns the closure's loss (detached).

        During a cycle, a non-finite loss or an exception from the extended model rolls back to
        the pre-extension state (see ``on_failure``), and the step is then taken on the user's
        model, so every call is one optimizer step."""
        self._last_closure = closure
        if self.phase == "return" and self.return_mode == "anneal":
            self._ext.set_homotopy(self._homotopy_at(self.phase_step))
        try:
            loss, value = self._forward(closure)
            if not math.isfinite(value) and self.phase != "train":
                raise _NonFiniteLoss(value)
            grad_norm = self._backward_and_step(loss)
        except MorphcError:
            raise
        except Exception as exc:
            if self.phase == "train":
                raise
            where = f"at {self.phase} step {self.phase_step}"
            if isinstance(exc, _NonFiniteLoss):
                self._last_loss = exc.value
                self._fail(f"non-finite loss ({exc.value}) {where}")
            else:
                self._fail(f"the extended model failed {where}: {type(exc).__name__}: {exc}",
                           exc)
            return self.step(closure)
        self._last_loss = value
        self.step_count += 1
        self.phase_step += 1
        self._advance(value, grad_norm, closure)
        return loss.detach()

    def finish(self, closure: Closure | None = None, steps: int | None = None) -> nn.Module:
        """Return the user's own model object, contracted. Mid-cycle, the return phase runs
        first: ``steps`` training steps (default: the rest of ``return_steps``) with ``closure``
        (default: the last closure given to ``step``). ``steps=0`` snaps onto C at once and
        records the function change that caused."""
        if self.phase == "train":
            self._module = None
            return self._user_model
        if self.phase == "bypass":
            self._enter_return(self.return_steps if steps is None else steps)
        elif steps is not None:
            self._return_from, self._return_len = self._ext.homotopy, int(steps)
            self.phase_step = 0
        closure = closure or self._last_closure
        if self._return_len - self.phase_step > 0 and closure is None:
            raise BypassError("finish() mid-cycle needs a closure to run the return phase: "
                              "finish(closure) or finish(steps=0) to snap onto C at once")
        while self.phase != "train":
            if self.phase_step >= self._return_len:
                self._contract()
            else:
                self.step(closure)
        self._module = None
        return self._user_model

    # -- one step ------------------------------------------------------------------------------
    def _forward(self, closure: Closure) -> tuple[torch.Tensor, float]:
        """Run the closure on the current module; the loss value every rank agrees on."""
        self.optimizer.zero_grad(set_to_none=True)
        if self._group is not None:
            self._group.zero_grad()
        if self.example_inputs is None:
            loss = self._capture_inputs(closure)
        else:
            loss = closure(self.model)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise BypassError(f"the closure must return a scalar loss tensor, got {loss!r}")
        value = float(loss.detach())
        if self.distributed:
            value = _all_reduce_mean(value, loss.device)
        return loss, value

    def _capture_inputs(self, closure: Closure) -> torch.Tensor:
        """First step: record the positional inputs of the user's model for tracing later."""
        captured: list = []

        def hook(module, args, kwargs):
            if not captured:
                captured.append((args, kwargs))

        handle = self._user_model.register_forward_pre_hook(hook, with_kwargs=True)
        module = self._wrap_current(compile=False) if self.compile else self.model
        try:
            loss = closure(module)
        finally:
            handle.remove()
        if not captured:
            raise BypassError("the closure never called the model it was given: call "
                              "closure(module) -> loss with module(...) inside, or pass "
                              "example_inputs=")
        args, kwargs = captured[0]
        if kwargs:
            raise BypassError(f"the model was called with keyword inputs {sorted(kwargs)}; "
                              "tracing needs positional inputs: pass example_inputs=(...)")
        self.example_inputs = tuple(a.detach() if isinstance(a, torch.Tensor) else a
                                    for a in args)
        return loss

    def _backward_and_step(self, loss: torch.Tensor) -> float | None:
        """Backward (plus the return-phase penalty), optional clipping, optimizer step."""
        total = loss
        if self.phase == "return" and self.return_mode == "penalty":
            total = loss + self._penalty_weight() * self._penalty_term()
        total.backward()
        grad_norm = None
        if self.max_grad_norm is not None:
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            params += self._group.params if self._group is not None else []
            grad_norm = float(nn.utils.clip_grad_norm_(params, self.max_grad_norm))
        elif self.phase == "train" and self.trigger.needs_grad_norm:
            grads = [p.grad for p in self._user_model.parameters() if p.grad is not None]
            grad_norm = float(nn.utils.get_total_norm(grads)) if grads else 0.0
        if self._group is None:
            self.optimizer.step()
        else:
            if "lr" not in self.extension_options:   # follow the user's LR schedule
                self._group.group["lr"] = \
                    self.extension_lr_scale * self.optimizer.param_groups[0]["lr"]
            self._group.step()
        return grad_norm

    def _advance(self, value: float, grad_norm: float | None, closure: Closure) -> None:
        """Phase transitions after a completed step."""
        if self.phase == "train":
            if self.max_cycles is not None and self.cycle >= self.max_cycles:
                return
            if self.trigger.update(value, step=self.step_count, grad_norm=grad_norm):
                self._begin_cycle(closure)
        elif self.phase == "bypass" and self.phase_step >= self.bypass_steps:
            self._enter_return(self.return_steps)
        if self.phase == "return" and self.phase_step >= self._return_len:
            self._contract()

    # -- the morphs ----------------------------------------------------------------------------
    def _begin_cycle(self, closure: Closure) -> None:
        """trigger → extend: snapshot, trace (once), choose sites, extend, join the optimizer."""
        snapshot = _Snapshot.take(self._user_model, self.optimizer)
        try:
            self._traced = self._traced or trace(self._user_model, self.example_inputs)
            sites, scores = self._choose_sites(closure)
            ext = self._extend(sites)
        except Exception as exc:
            self._event("failure", reason=f"extension failed: {type(exc).__name__}: {exc}")
            self.failures += 1
            self.trigger.reset()
            if self.on_failure == "raise":
                raise BypassError(f"morphc could not extend the model ({exc}); nothing was "
                                  "changed. Choose other sites= or on_failure='rollback' to "
                                  "keep training without this cycle.") from exc
            return
        if scores is not None:
            ext.config.escape_scores, ext.config.selection = scores, "auto"
        self._attach(ext, snapshot)
        self._event("extend", sites=ext.config.sites, widths=ext.config.widths,
                    scores=scores)

    def _choose_sites(self, closure: Closure):
        """Resolve ``sites``; for ``"auto"`` rank by escape score, agreed across ranks."""
        spec = self.extend_options["sites"]
        if not (isinstance(spec, str) and spec == "auto"):
            return spec, None
        full = self._extend("all")
        probe = self.probe
        if probe == "closure":
            probe = closure
        elif probe is None:
            probe = random_direction_probe(self.example_inputs, self.seed)
        scores = escape_scores(full, probe)
        names = list(scores)
        if self.distributed:
            values = torch.tensor([scores[n] for n in names], dtype=torch.float64)
            torch.distributed.all_reduce(values)
            scores = dict(zip(names, (float(v) for v in values), strict=True))
        keep = self.top_k or max(1, math.ceil(len(names) / 2))
        best = set(sorted(names, key=lambda n: -scores[n])[:keep])
        return [n for n in names if n in best], scores

    def _extend(self, sites) -> ExtendedModel:
        opts = self.extend_options
        if isinstance(sites, list):   # exact names: never let a name act as a suffix / regex
            wanted = set(sites)
            sites = lambda site: site.name in wanted  # noqa: E731
        return extend(self._user_model, self.example_inputs, sites=sites, width=opts["width"],
                      activation=opts["activation"], exclude=opts["exclude"],
                      overrides=opts["overrides"], seed=self.seed + self.cycle + self.failures,
                      init_scale=opts["init_scale"], traced=self._traced)

    def _attach(self, ext: ExtendedModel, snapshot: _Snapshot) -> None:
        """Make ``ext`` the current module; its parameters get their own optimizer group."""
        self._ext, self._snapshot = ext, snapshot
        self._group = _ExtensionGroup(self.optimizer, list(ext.extension_parameters()),
                                      self.extension_options)
        self._module = None
        self.phase, self.phase_step = "bypass", 0
        if self.bypass_steps == 0:
            self._enter_return(self.return_steps)

    def _enter_return(self, steps: int) -> None:
        self.phase, self.phase_step = "return", 0
        self._return_from, self._return_len = self._ext.homotopy, int(steps)
        self._event("return", mode=self.return_mode, steps=int(steps))

    def _homotopy_at(self, index: int) -> float:
        """s for return step ``index`` (0-based): linear from ``_return_from`` to exactly 0 at
        the last step, so that step already trains on C."""
        done = min(index + 1, self._return_len)
        return 0.0 if done >= self._return_len else \
            self._return_from * (1.0 - done / self._return_len)

    def _penalty_weight(self) -> float:
        return self.penalty * ((self.phase_step + 1) / max(self._return_len, 1)) ** 2

    def _penalty_term(self) -> torch.Tensor:
        """Σ over branches and units of ‖α − α_C(α)‖²: the squared constraint equations,
        differentiable in α for every unit (the max-norm residual would move one unit only)."""
        terms = []
        for branch in self._ext.branches.values():
            alpha = branch.effective_alpha()
            terms.append((alpha - branch.compiled.project(alpha)).pow(2).sum())
        return torch.stack(terms).sum()

    def _contract(self) -> None:
        """return → contract: fold into the user's Parameters; leave the optimizer; go on.

        ``anneal`` ends exactly on C, so the fold is exact or refused (a residual left there
        is a bug, rolled back, never folded silently). ``penalty`` and a return of 0 steps
        snap onto C, and the snap's function change is recorded (``max_snap_change`` caps it).
        """
        ext = self._ext
        residual = ext.constraint_residual()
        force = self.return_mode == "penalty" or self._return_len == 0
        try:
            contract(ext, force=force)
            report = ext.contraction_report
            snap = report.snap_change
            if self.max_snap_change is not None and snap is not None and \
                    snap > self.max_snap_change:
                raise BypassError(f"the snap onto C changed the output by {snap:.3g} > "
                                  f"max_snap_change={self.max_snap_change:g}; use more "
                                  "return_steps or a larger penalty")
        except MorphcError as exc:
            self._fail(f"contraction failed: {exc}", exc)
            return
        self._detach()
        self.cycle += 1
        self._event("contract", residual=residual, deviation=report.deviation,
                    snap_change=snap, sites=ext.config.sites)

    def _detach(self) -> None:
        """Drop the extension: its param group and state leave the optimizer."""
        self._ext = self._group = self._snapshot = None
        self._module = None
        self.phase, self.phase_step = "train", 0
        self.trigger.reset()

    def _fail(self, reason: str, exc: BaseException | None = None) -> None:
        """Restore the pre-extension state, then carry on or raise (``on_failure``)."""
        snapshot, step = self._snapshot, self.step_count
        self._detach()
        snapshot.restore(self._user_model, self.optimizer)
        self.failures += 1
        self._event("rollback", reason=reason)
        if self.on_failure == "raise":
            raise BypassError(f"{reason}. The model, its buffers and the optimizer state were "
                              f"restored to their values before this cycle's extension; "
                              f"training can continue from step {step}, or pass "
                              "on_failure='rollback' to do that automatically.") from exc

    # -- wrapping, events ----------------------------------------------------------------------
    def _wrap_current(self, compile: bool | None = None) -> nn.Module:
        """The current module with compile / DDP / ``wrap`` applied (compile innermost, so DDP
        hooks stay in eager code)."""
        compile = self.compile if compile is None else compile
        if self._ext is not None:
            module = self._ext
            if compile:
                module = torch.compile(self._ext.graph_module, backend=self.compile_backend,
                                       **self.compile_options)
        else:
            module = self._user_model
            if compile:
                if self._compiled_user is None:
                    self._compiled_user = torch.compile(module, backend=self.compile_backend,
                                                        **self.compile_options)
                module = self._compiled_user
        if self.ddp:
            module = nn.parallel.DistributedDataParallel(module, **self.ddp_options)
        if self.wrap is not None:
            module = self.wrap(module)
        return module

    def _event(self, kind: str, **fields) -> None:
        """Append to ``history`` (and log): what happened, at which step, at which loss."""
        event = {"step": self.step_count, "event": kind, "phase": self.phase,
                 "cycle": self.cycle, "loss": self._last_loss}
        if self._ext is not None and "residual" not in fields:
            fields["residual"] = self._ext.constraint_residual()
        event.update({k: _plain(v) for k, v in fields.items()})
        self.history.append(event)
        details = ", ".join(f"{k}={_short(v)}" for k, v in event.items()
                            if k not in ("event", "step") and v is not None)
        self._log(f"step {self.step_count}: {kind} ({details})")

    def _log(self, message: str) -> None:
        """Log lines go to the ``morphc.bypass`` logger; with ``verbose`` they are also printed
        to stderr when logging is not configured to show them (so they appear exactly once)."""
        logger.info(message)
        shown = logger.isEnabledFor(logging.INFO) and logger.hasHandlers()
        if self.verbose and not shown:
            print(f"[morphc.runtime.bypass] {message}", file=sys.stderr)

    # -- checkpoints ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything needed to resume mid-cycle, as tensors / numbers / lists / dicts (loads
        with ``torch.load(weights_only=True)``): counters, phase, trigger, history, the user's
        model, the optimizer (extension group included), and the extension if one is active."""
        state = {"version": STATE_VERSION, "phase": self.phase, "step": self.step_count,
                 "phase_step": self.phase_step, "cycle": self.cycle, "failures": self.failures,
                 "return_from": self._return_from, "return_len": self._return_len,
                 "last_loss": self._last_loss, "trigger": self.trigger.state_dict(),
                 "history": list(self.history),
                 "model": self._user_model.state_dict(),
                 "optimizer": self.optimizer.state_dict(),
                 "example_inputs": None if self.example_inputs is None else
                 list(self.example_inputs), "extension": None}
        if self._ext is not None:
            cfg = self._ext.config
            named = dict(self._ext.named_extension_parameters())
            state["extension"] = {
                "sites": list(cfg.sites), "widths": dict(cfg.widths),
                "families": dict(cfg.families), "seed": cfg.seed,
                "init_scale": cfg.init_scale, "scores": cfg.escape_scores,
                "homotopy": self._ext.homotopy,
                "params": {n: p.detach().clone() for n, p in named.items()},
                "optimizer": self._group.state_dict({p: n for n, p in named.items()}),
                "snapshot": self._snapshot.state_dict()}
        return state

    def load_state_dict(self, state: dict) -> None:
        """Resume from :meth:`state_dict`, on a fresh ``Bypass`` over a model of the same
        architecture (re-extends identically when the checkpoint was taken mid-cycle)."""
        if state.get("version") != STATE_VERSION:
            raise BypassError(f"unknown Bypass checkpoint version {state.get('version')!r}; "
                              f"this morphc writes version {STATE_VERSION}")
        if self._ext is not None:
            self._detach()
        self._user_model.load_state_dict(state["model"])
        inputs = state["example_inputs"]
        self.example_inputs = None if inputs is None else tuple(inputs)
        extension = state["extension"]
        if extension is not None:
            self._restore_extension(extension)
        self.optimizer.load_state_dict(state["optimizer"])
        self.trigger.load_state_dict(state["trigger"])
        self.history = list(state["history"])
        self.phase, self.step_count = state["phase"], int(state["step"])
        self.phase_step, self.cycle = int(state["phase_step"]), int(state["cycle"])
        self.failures, self._last_loss = int(state["failures"]), state["last_loss"]
        self._return_from = float(state["return_from"])
        self._return_len = int(state["return_len"])
        self._module = None

    def _restore_extension(self, extension: dict) -> None:
        """Rebuild the extension of a checkpoint: same sites, widths, families, values."""
        self._traced = self._traced or trace(self._user_model, self.example_inputs)
        wanted = set(extension["sites"])
        overrides = {n: {"width": extension["widths"][n], "activation": extension["families"][n]}
                     for n in extension["sites"]}
        ext = extend(self._user_model, self.example_inputs, sites=lambda s: s.name in wanted,
                     overrides=overrides, seed=int(extension["seed"]),
                     init_scale=float(extension["init_scale"]), traced=self._traced)
        with torch.no_grad():
            for name, param in ext.named_extension_parameters():
                param.copy_(extension["params"][name])
        ext.set_homotopy(extension["homotopy"])
        ext.config.escape_scores = extension["scores"]
        self._ext, self._snapshot = ext, _Snapshot.from_state(extension["snapshot"])
        params = list(ext.extension_parameters())
        self._group = _ExtensionGroup(self.optimizer, params, self.extension_options)
        self._group.load_state_dict(extension["optimizer"],
                                    dict(ext.named_extension_parameters()))


# -- module-level helpers ----------------------------------------------------------------------
def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise BypassError(f"{name} must be one of {choices}, got {value!r}")


def _as_tuple(inputs) -> tuple:
    return (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)


def _make_optimizer(model: nn.Module, optimizer) -> torch.optim.Optimizer:
    """Accept a ready optimizer (it must hold the model's parameters) or build one."""
    if isinstance(optimizer, torch.optim.Optimizer):
        held = {id(p) for g in optimizer.param_groups for p in g["params"]}
        missing = [n for n, p in model.named_parameters() if id(p) not in held]
        if missing:
            raise BypassError(f"the optimizer does not hold the model's parameters {missing[:5]}"
                              "; build it over model.parameters() or pass a factory "
                              "lambda params: torch.optim.Adam(params, ...)")
        return optimizer
    if not callable(optimizer):
        raise BypassError("optimizer must be a torch.optim.Optimizer or a factory "
                          f"params -> Optimizer, got {type(optimizer).__name__}")
    built = optimizer(list(model.parameters()))
    if not isinstance(built, torch.optim.Optimizer):
        raise BypassError(f"the optimizer factory returned {type(built).__name__}, not a "
                          "torch.optim.Optimizer")
    return built


def _resolve_distributed(flag: bool | None) -> bool:
    """Agree across ranks on every decision iff a process group with > 1 rank is running."""
    running = torch.distributed.is_available() and torch.distributed.is_initialized() and \
        torch.distributed.get_world_size() > 1
    if flag and not running:
        raise BypassError("distributed=True but no torch.distributed process group with more "
                          "than one rank is initialised; call init_process_group first")
    return running if flag is None else bool(flag)


def _all_reduce_mean(value: float, device: torch.device) -> float:
    """The mean loss over ranks: every rank's trigger sees the same number, and a NaN on any
    rank is a NaN on all (so all roll back together instead of deadlocking in backward)."""
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(tensor)
    return float(tensor) / torch.distributed.get_world_size()


def _short(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_short(v)}" for k, v in value.items()) + "}"
    return str(value)
