"""``morphc.Bypass``: escape stagnation inside the user's own training loop.

The pipeline, repeatable any number of times::

    train ──trigger──▶ extend ──▶ bypass ──▶ return ──▶ contract ──▶ accept or roll back ──▶ train

This module is the facade users call (``step``, ``finish``, ``model``, ``state_dict``); the cycle
itself is :class:`~morphc.runtime.cycle.Cycle`, the settings :class:`~morphc.runtime.config.
BypassConfig`, the optimizer group, snapshots, wrapping and the event log live beside it.

>>> import torch, torch.nn.functional as F, morphc
>>> model = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
>>> x, y = torch.randn(32, 3), torch.randn(32, 1)
>>> bp = morphc.Bypass(model, lambda p: torch.optim.Adam(p, lr=1e-2),
...                    trigger=morphc.Schedule(every=5), bypass_steps=5, return_steps=5,
...                    verbose=False)
>>> for _ in range(20):
...     loss = bp.step(lambda m: F.mse_loss(m(x), y))
>>> bp.finish() is model
True
"""

from __future__ import annotations

import warnings
from collections import deque
from collections.abc import Mapping

import torch
from torch import nn

from morphc.compiler.extend import check_override_settings, check_width
from morphc.compiler.extended import already_extended, floating_dtype_device
from morphc.errors import BypassError, MorphcError, SiteError, TraceError
from morphc.families import get_family
from morphc.ir.example_inputs import as_tuple, run_example
from morphc.ir.sites import select_sites, site_patterns
from morphc.ir.trace import trace
from morphc.passes.find_sites import find_sites
from morphc.passes.infra import Pipeline
from morphc.runtime.between_steps import BetweenSteps
from morphc.runtime.config import BypassConfig, Phase, no_scaler, one_exclude_pattern
from morphc.runtime.cycle import Cycle
from morphc.runtime.cycle_runner import CycleRunner
from morphc.runtime.cycle_state import extension_state, restore_cycle
from morphc.runtime.events import EventLog
from morphc.runtime.optimizer_group import loss_sign, make_optimizer, training_group
from morphc.runtime.shadow import Probation, Shadow
from morphc.runtime.steps import Closure
from morphc.runtime.triggers import Plateau, Trigger
from morphc.runtime.user_edits import (
    ResolveBeforeLoad,
    ResolveBeforeOptimizerLoad,
    WarnHalfCheckpoint,
    edited_since,
)
from morphc.runtime.wrapping import Wrapping, resolve_distributed, unwrap

STATE_VERSION = 3


def check_branch_settings(cfg: BypassConfig) -> None:
    """Refuse a width, activation or override that every cycle's extension would refuse, at
    construction: found only when the first cycle starts, it would end Bypass for the run."""
    check_width(cfg.width)
    get_family(cfg.activation)
    if not callable(cfg.sites) and cfg.sites not in ("all", "auto") and \
            not site_patterns(cfg.sites):
        raise SiteError("sites=[] selects no site, so no cycle could ever start: pass site "
                        "names or patterns, or leave sites='all' (the default)")
    site_patterns(cfg.exclude, "exclude")
    check_override_settings(cfg.overrides)


class Bypass(BetweenSteps, CycleRunner):
    """Train ``model`` as usual; when training stagnates, extend, train, return, contract — and
    keep the cycle only if it paid.

    >>> bp = Bypass(model, lambda params: torch.optim.Adam(params, lr=1e-3))   # doctest: +SKIP
    >>> for x, y in loader:                                                     # doctest: +SKIP
    ...     loss = bp.step(lambda m: F.cross_entropy(m(x), y))
    >>> model = bp.finish()                                                     # doctest: +SKIP

    ``optimizer``: a factory ``params -> Optimizer`` or an optimizer built over the model's
    parameters (keep driving your scheduler on it). ``trigger``: default :class:`Plateau`.
    Every other setting is a keyword of :class:`~morphc.runtime.config.BypassConfig`, explained
    in the README ("Bypass in your own loop"): phases (``bypass_steps``, ``return_steps``,
    ``free_phase``, ``return_mode``), acceptance (``accept``, ``eval_closure``,
    ``judge_batches``), sites (``sites``, ``width``, ``activation``, ``exclude``, ``overrides``,
    ``top_k``, ``probe``), the extension's
    optimizer group (``extension_options``, ``extension_lr_scale``), budget (``max_cycles``,
    ``total_steps``), failures (``on_failure``), plain training beside each cycle (``shadow``),
    wrapping (``compile``, ``ddp``, ``wrap``).
    """

    def __init__(self, model: nn.Module, optimizer, trigger: Trigger | None = None,
                 **options) -> None:
        model, was_ddp, was_compiled = unwrap(model)
        refused = already_extended(model, "Bypass")
        if refused:
            raise BypassError(refused)
        if not isinstance(model, nn.Module):
            raise BypassError(f"Bypass trains an nn.Module, got {type(model).__name__}: wrap a "
                              "function in a Module whose parameters are its weights")
        if isinstance(model, torch.jit.ScriptModule):
            raise BypassError(f"{type(model).__name__} is TorchScript (torch.jit.script / "
                              "torch.jit.trace), which morphc cannot trace or extend: hand "
                              "Bypass the nn.Module before scripting, and script the model "
                              "bp.finish() returns")
        if not any(p.requires_grad for p in model.parameters()):
            raise BypassError(f"{type(model).__name__} has no trainable parameter (none, or all "
                              "requires_grad=False): there is nothing for Bypass to train")
        no_scaler(options)
        try:
            self.config = BypassConfig(**one_exclude_pattern(options))
        except TypeError as exc:
            known = sorted(BypassConfig.__dataclass_fields__)
            raise BypassError(f"{exc}; Bypass takes these settings: {known}") from None
        cfg = self.config
        check_branch_settings(cfg)
        self._user_model = model
        self.optimizer = make_optimizer(model, optimizer)
        self._sign = loss_sign(self.optimizer)   # judged values are losses to minimise
        self.trigger = trigger if trigger is not None else Plateau()
        if not isinstance(self.trigger, Trigger):
            raise BypassError(f"trigger must be a morphc.Trigger, got {type(trigger).__name__}")
        self.wrapping = Wrapping(cfg.compile or was_compiled, cfg.compile_backend,
                                 cfg.compile_options, cfg.ddp or was_ddp, cfg.ddp_options,
                                 cfg.wrap)
        self.distributed = resolve_distributed(cfg.distributed)
        self.log = EventLog(cfg.verbose)
        self.example_inputs = None if cfg.example_inputs is None else \
            as_tuple(cfg.example_inputs)
        self.example_kwargs = dict(cfg.example_kwargs or {})
        if self.example_inputs is not None:
            self._check_example_inputs()
            self._check_site_names()
        self._traced, self._traced_structure, self._traced_settings = None, None, None
        self._inputs_as = None if self.example_inputs is None else \
            floating_dtype_device(self._user_model)   # what the inputs fit (see _trace)
        self._cycle: Cycle | None = None
        self._module: nn.Module | None = None
        self._last_closure: Closure | None = None
        # what verdicts judge on without eval_closure (Verdicts._judged_on): kept only while a
        # cycle or a probation is in flight, so no batch outlives its step otherwise
        self._recent_closures: deque[Closure] = deque(maxlen=self.config.judge_batches)
        self._last_loss: float | None = None
        self._weight_versions = self._buffer_versions = None   # edits between steps
        self._grads_left: tuple | None = None    # a backward between steps (steps.py)
        self._grads_watched: tuple = ((), [])    # (group sizes, the parameters it reads)
        self._warned_edited = self._warned_buffers = self._warned_half = self._warned_grads = False
        self._peak_lr = float(training_group(self.optimizer).get("lr", 0.0))
        self._lr_seen, self._lr_changed_at = self._peak_lr, 0   # how long the lr held still
        self._unpaid, self._quiet_until, self._disabled = 0, 0, None
        self._probation: Probation | None = None   # plain training after a kept cycle
        self._lr_scale = float(self.config.extension_lr_scale)   # halved after a divergence
        self.step_count = self.cycle = self.failures = 0
        self._loading = False      # bp.load_state_dict's own optimizer load resolves nothing
        self._load_hooks = ResolveBeforeLoad.on(self, model) + \
            ResolveBeforeOptimizerLoad.on(self, self.optimizer) + WarnHalfCheckpoint.on(self, model)

    # -- what the user calls -----------------------------------------------------------------
    @property
    def model(self) -> nn.Module:
        """The module to call right now: the extended model during a cycle, else the user's
        model (wrapped in DDP / compiled when asked). Between a cycle's steps, asking for it
        puts the cycle's values back in your tensors until the next step ends (they show plain
        training's otherwise: :meth:`_show_plain`)."""
        self._show_run()
        if self._module is None:
            ext = None if self._cycle is None else self._cycle.ext
            self._module = self.wrapping.around(self._user_model, ext)
        return self._module

    @property
    def extended(self):
        """The current ``ExtendedModel`` (None outside a cycle), with the cycle's values in
        your tensors (as :attr:`model`)."""
        self._show_run()
        return None if self._cycle is None else self._cycle.ext

    @property
    def phase(self) -> Phase:
        return Phase.TRAIN if self._cycle is None else self._cycle.phase

    @property
    def phase_step(self) -> int:
        return 0 if self._cycle is None else self._cycle.phase_step

    @property
    def extension_group(self):
        """The extension's optimizer param group (None outside a cycle)."""
        return None if self._cycle is None else self._cycle.group

    @property
    def history(self) -> list[dict]:
        """Every event (``extend``, ``return``, ``contract``, ``rollback``, ``skip``,
        ``failure``) with its step, phase, cycle, loss and measures."""
        return self.log.events

    @property
    def last_loss(self) -> float | None:
        """The loss of ``bp.model`` at the last step: the extended model's during a cycle, the
        kept run's on probation — for logs and plots. ``bp.step`` returns plain training's
        loss there, for schedulers and early stops."""
        return self._last_loss

    def step(self, closure: Closure) -> torch.Tensor:
        """One training step: zero_grad, ``closure(bp.model)``, backward, optimizer step, then
        whatever morph is due. Returns the closure's loss (detached) — while plain training
        runs beside a cycle or a probation, its loss on this batch, so a scheduler or an early
        stop fed it acts as it would without Bypass.

        A non-finite loss or gradient never reaches the weights: outside a cycle the step is
        skipped (``on_failure="raise"``: a BypassError), inside one the cycle is rolled back."""
        if not callable(closure) or isinstance(closure, nn.Module):
            raise BypassError(
                f"bp.step expects a closure `module -> loss` (e.g. lambda m: F.mse_loss(m(x), "
                f"y)), got {type(closure).__name__}: Bypass calls it on the module to train now")
        self._warn_grads_dropped()
        self._last_closure = closure
        self._show_run()
        if self._probation is not None:      # a cycle's plain copy took what the user did
            self._check_buffers()
        if self._cycle is not None or self._probation is not None:
            self._recent_closures.append(closure)
        elif self._recent_closures:
            self._recent_closures.clear()
        try:
            if self._cycle is not None:
                return self._cycle_step(closure)
            if self._probation is not None:
                return self._step_on_probation(closure)
            return self._train_step(closure)
        finally:     # what the next step compares, while plain training runs beside the run
            self._show_plain()
            self._count_versions()
            self._note_grads_left()

    def finish(self) -> nn.Module:
        """The user's own model object, in its own architecture. Never trains: a cycle still in
        flight is snapped onto C, contracted, and kept only if that pays (the same acceptance
        test as every cycle); otherwise it is rolled back."""
        self._show_run()                     # a cycle's: what the user did went to plain's
        edited = self._probation is not None and edited_since(self._weight_versions)
        if self._probation is not None:      # on probation, as a step sees them
            self._check_buffers()
        if edited:
            self._warn_edited()
        if self._cycle is not None and not self._changed_since(self._cycle, modes=False,
                                                                 settings=False):
            with self._whole_on_error(self._cycle):
                self._close_cycle(self._last_closure, finishing=True)
        if self._probation is not None and edited:
            self._probation = None
            self._event("probation", loss_after=None, loss_plain=None, to="cycle",
                        reason="weights edited after the last step")
        elif self._probation is not None:
            self._end_probation(self._last_closure, final=True)
        self._module = None
        self._count_versions()
        return self._user_model

    def _before_load(self) -> None:
        """Weights about to be loaded into the user's model, or a state into its optimizer
        (:class:`ResolveBeforeLoad`)."""
        if self._cycle is not None or self._probation is not None:
            self.finish()

    def __del__(self) -> None:
        for handle in getattr(self, "_load_hooks", ()):
            handle.remove()
        if getattr(self, "_cycle", None) is not None:
            warnings.warn("a morphc.Bypass was dropped mid-cycle: the user's model does not hold "
                          "the extension's share of the function yet. Call bp.finish() when "
                          "training ends.", RuntimeWarning, stacklevel=2)

    # -- construction checks -------------------------------------------------------------------
    def _check_example_inputs(self) -> None:
        """Run the model once on ``example_inputs`` so a wrong shape or dtype surfaces now."""
        try:
            run_example(self._user_model, self.example_inputs, self.example_kwargs)
        except TraceError as exc:
            raise BypassError(f"{exc} Pass example_inputs of the shape and dtype of a real "
                              "batch.") from exc.__cause__

    def _check_site_names(self) -> None:
        """Site names / patterns that match nothing are a ``SiteError`` now, not a failed first
        cycle that ends Bypass for the run (a model that does not trace is left to the cycle)."""
        cfg = self.config
        if callable(cfg.sites) or cfg.sites in ("all", "auto") and not cfg.exclude:
            return
        try:
            traced = trace(self._user_model, self.example_inputs,
                           kwargs=self.example_kwargs or None,
                           dynamic_shapes=cfg.dynamic_shapes)
        except MorphcError:
            return
        table = Pipeline(traced.graph_module).run(find_sites).analysis
        if table.extendable():
            frozen = [n for n, p in traced.graph_module.named_parameters()
                      if not p.requires_grad]
            select_sites(table, "all" if cfg.sites == "auto" else cfg.sites, cfg.exclude,
                         frozen)

    # -- checkpoints ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything needed to resume mid-cycle, as tensors / numbers / lists / dicts (loads
        with ``torch.load(weights_only=True)``)."""
        return {"version": STATE_VERSION, "step": self.step_count, "cycle": self.cycle,
                "failures": self.failures, "last_loss": self._last_loss,
                "peak_lr": self._peak_lr, "unpaid": self._unpaid, "lr_scale": self._lr_scale,
                "lr_seen": self._lr_seen, "lr_changed_at": self._lr_changed_at,
                "quiet_until": self._quiet_until, "disabled": self._disabled,
                "trigger": self.trigger.state_dict(), "history": list(self.history),
                "model": self._run_state(),
                "optimizer": self._run_optimizer_state(),
                "example_inputs": None if self.example_inputs is None else
                list(self.example_inputs), "example_kwargs": dict(self.example_kwargs),
                "extension": extension_state(self._cycle),
                "probation": None if self._probation is None else self._probation.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Resume from :meth:`state_dict`, on a fresh ``Bypass`` over a model of the same
        architecture (re-extends identically when the checkpoint was taken mid-cycle)."""
        self._check_checkpoint(state)
        if self._cycle is not None:
            self._detach()
        self._probation = None         # nothing in flight: the load hook resolves nothing
        self._user_model.load_state_dict(state["model"])
        inputs = state["example_inputs"]
        self.example_inputs = None if inputs is None else tuple(inputs)
        self.example_kwargs = dict(state.get("example_kwargs") or {})   # older checkpoints: none
        self._inputs_as = None if inputs is None else floating_dtype_device(self._user_model)
        if state["extension"] is not None:
            self._trace()
            self._cycle = restore_cycle(state["extension"], model=self._user_model,
                                        example_inputs=self.example_inputs,
                                        traced=self._traced, optimizer=self.optimizer,
                                        config=self.config)
            self._cycle.structure = self._traced_structure
            self._cycle.watch_settings(self._user_model)
        self._loading = True
        try:
            self.optimizer.load_state_dict(state["optimizer"])
        finally:
            self._loading = False
        shadow = (state["extension"] or {}).get("shadow")
        if shadow is not None and self._cycle is not None:   # after the optimizer: it copies it
            self._cycle.shadow = Shadow.from_state(shadow, self._user_model, self.optimizer,
                                                    self.wrapping.around_copy)
        probation = state.get("probation")                  # older checkpoints: none
        self._probation = None if probation is None else \
            Probation.from_state(probation, self._user_model, self.optimizer,
                                 self.wrapping.around_copy)
        if self._probation is not None:
            self._probation.shadow.keep_outside = not self.wrapping.compile
        self.trigger.load_state_dict(state["trigger"])
        self.log.events[:] = list(state["history"])
        self.step_count, self.cycle = int(state["step"]), int(state["cycle"])
        self.failures, self._last_loss = int(state["failures"]), state["last_loss"]
        self._peak_lr, self._unpaid = float(state["peak_lr"]), int(state["unpaid"])
        self._lr_seen = float(state.get("lr_seen", self._peak_lr))      # older checkpoints
        self._lr_changed_at = int(state.get("lr_changed_at", state["step"]))
        self._lr_scale = float(state["lr_scale"])
        self._quiet_until, self._disabled = int(state["quiet_until"]), state["disabled"]
        self._module = None
        self._grads_left = None
        self._show_plain()
        self._count_versions()   # what was loaded is no edit: the versions count from here

    def _check_checkpoint(self, state) -> None:
        """Refuse a checkpoint that is not one of ours or not of this model before anything
        loads (``nn.Module.load_state_dict`` copies the matching tensors before it raises)."""
        if not isinstance(state, Mapping) or state.get("version") != STATE_VERSION:
            found = state.get("version") if isinstance(state, Mapping) else type(state).__name__
            raise BypassError(f"not a Bypass checkpoint of version {STATE_VERSION} (got "
                              f"{found!r}); pass what bp.state_dict() returned")
        missing = sorted(set(self.state_dict()) - set(state) -
                         {"example_kwargs", "probation", "lr_seen", "lr_changed_at"})
        if missing:
            raise BypassError(f"the Bypass checkpoint lacks {missing}; pass what "
                              "bp.state_dict() returned")
        ours, theirs = self._own_state_dict(), state["model"]
        if not isinstance(theirs, Mapping):
            raise BypassError("the Bypass checkpoint's 'model' is not a state_dict")
        wrong = [f"{k}: {tuple(theirs[k].shape)} in the checkpoint, {tuple(v.shape)} here"
                 for k, v in ours.items() if k in theirs and
                 isinstance(theirs[k], torch.Tensor) and theirs[k].shape != v.shape]
        unknown, absent = sorted(set(theirs) - set(ours)), sorted(set(ours) - set(theirs))
        if wrong or unknown or absent:
            raise BypassError(
                f"the Bypass checkpoint is of another architecture than "
                f"{type(self._user_model).__name__}: " + "; ".join(
                    [*wrong[:5], *([f"keys not in this model: {unknown[:5]}"] if unknown else []),
                     *([f"keys missing: {absent[:5]}"] if absent else [])])
                + ". Nothing was loaded; resume on a model built like the one that was saved")

    def _warn(self, message: str) -> None:
        warnings.warn(message, RuntimeWarning, stacklevel=4)
