"""Bypass driven by someone else's training loop: the core both trainer callbacks share.

The trainer owns the loop — forward, backward, gradient accumulation, clipping, mixed precision,
``optimizer.step()``, the LR scheduler, checkpoints. A callback tells this object three things:
a micro-batch is about to run (:meth:`~TrainerBypass.before_micro_batch`), its loss
(:meth:`~TrainerBypass.record_loss`), and an optimizer step is done (:meth:`~TrainerBypass.
after_step`). Everything else is the runtime's: the trigger, :class:`~morphc.runtime.cycle.Cycle`
(schedule, acceptance rule ``Cycle.pays``), :class:`~morphc.runtime.snapshot.Snapshot`
(bit-identical rollback), :class:`~morphc.runtime.optimizer_group.ExtensionGroup` and the
event log.

How the pieces sit inside a trainer:

- **Extension in place.** Forward hooks on the user's site modules
  (:class:`~morphc.integrations.extension.InPlaceExtension`); the model object, its ``forward``
  and its ``state_dict`` keys never change.
- **Optimizer and scheduler.** The extension's param group joins the trainer's (raw torch)
  optimizer only *inside* ``optimizer.step()`` — a step pre-hook attaches it, a post-hook takes it
  out. So the trainer's scheduler never sees a group it did not create (torch 2.13's LambdaLR
  zips its per-group lists strictly and would crash on one), and every ``optimizer.state_dict()``
  a checkpoint writes holds the user's groups only. The group's lr is ``extension_lr_scale`` ×
  the lr the scheduler gave group 0 for this step (or the first group that trains, when group 0
  is held at lr 0), so the extension follows the trainer's warm-up and decay; a cycle whose
  loss went non-finite halves that scale for the next cycles.
- **Free phase.** ``free_phase="joint"`` (default) alternates s = 1 / s = 0 from one micro-batch
  to the next: with gradient accumulation 2 every optimizer step trains ``L(s=1) + L(s=0)`` as
  Bypass's joint step does (on two half-batches); without accumulation, alternate steps do. As
  there, the s = 1 pass leaves BatchNorm statistics as they were (they belong to s = 0).
- **Acceptance, noise-averaged.** ``loss_before`` is the mean training loss of the last
  ``window`` optimizer steps before the extension (the pre-extension model, as it trained);
  ``loss_after`` the mean over the last ``window`` steps of the return phase. With
  ``return_mode="project"`` those steps run at s = 0, where the extended model computes exactly
  what the folded model will, so ``loss_after`` is the folded model's training loss. ``Cycle.pays``
  decides (beat plain training's recent pace over the cycle's length) and, with plain
  training beside the cycle, beat its mean loss over the same steps too.
- **Plain training beside the cycle** (``shadow=True``, default;
  :mod:`~morphc.integrations.plain`): the trainer's step count and LR schedule move on during a
  cycle, so restoring the state from before it would lose the cycle's steps. Plain training's
  step is taken on the same micro-batches (replayed by the callback) and a cycle that does not
  pay — or is resolved off C — hands its state over: where the user would be without morphc.
  After a kept cycle it goes on beside the run for a probation
  (:mod:`~morphc.integrations.trainer_probation`) and is handed over if it then leads.
  Without it (``shadow=False``, or a model the callback cannot replay) the model, buffers and
  optimizer state go back to their values before the extension, bit for bit.
- **Checkpoints.** A checkpoint never holds an extension: the callbacks resolve a cycle in flight
  first (:meth:`~TrainerBypass.resolve`): fold it if it is on C (judged on the return steps it
  had), else roll it back; a probation in flight is judged then too.
"""

from __future__ import annotations

import math
from collections import deque

import torch
from torch import nn

from morphc.compiler.extended import already_extended
from morphc.errors import BypassError, SiteError
from morphc.integrations.extension import InPlaceExtension
from morphc.integrations.plain import PlainBeside, Replay
from morphc.integrations.sites import module_sites
from morphc.integrations.trainer_cycle import TrainerCycle
from morphc.integrations.trainer_probation import TrainerProbation
from morphc.ir.sites import select_sites
from morphc.runtime.bypass import check_branch_settings
from morphc.runtime.config import BypassConfig, FreePhase, Phase, ReturnMode, one_exclude_pattern
from morphc.runtime.cycle import Cycle, may_start
from morphc.runtime.events import EventLog
from morphc.runtime.optimizer_group import loss_sign, training_group
from morphc.runtime.steps import clip
from morphc.runtime.triggers import Plateau, Trigger

# settings of Bypass that only make sense when Bypass owns the loop
_NOT_HERE = {"probe": "sites='auto' needs a probe closure", "example_inputs": "nothing is traced",
             "example_kwargs": "nothing is traced", "dynamic_shapes": "nothing is traced",
             "eval_closure": "acceptance uses the training loss stream",
             "compile": "the trainer compiles", "compile_backend": "the trainer compiles",
             "compile_options": "the trainer compiles", "ddp": "the trainer wraps the model",
             "ddp_options": "the trainer wraps the model", "wrap": "the trainer wraps the model",
             "distributed": "single-process only", "top_k": "sites='auto' is not available",
             "max_grad_norm": "the trainer's own clipping setting is used",
             "max_bypass_steps": "cycles have a fixed length (bypass_steps) inside a trainer",
             "total_steps": "taken from the trainer", "penalty": "return_mode='penalty' is not "
             "available"}


def raw_optimizer(optimizer) -> torch.optim.Optimizer:
    """accelerate's ``AcceleratedOptimizer`` / Lightning's ``LightningOptimizer`` → the torch
    optimizer underneath (whose step hooks fire whichever wrapper calls it)."""
    for _ in range(4):
        inner = getattr(optimizer, "optimizer", None) or getattr(optimizer, "_optimizer", None)
        if inner is None or inner is optimizer:
            break
        optimizer = inner
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise BypassError(f"the trainer's optimizer is a {type(optimizer).__name__}, not a "
                          "torch.optim.Optimizer (or a wrapper of one)")
    return optimizer


class TrainerBypass(TrainerCycle):
    """Bypass cycles inside a trainer's loop, over the user's model, extended in place.

    ``trigger``: default :class:`~morphc.Plateau`. ``window``: optimizer steps averaged for
    acceptance (default: ``min(20, return_steps)``). Other settings are those of
    :class:`~morphc.Bypass` that apply when a trainer owns the loop: ``bypass_steps``,
    ``return_steps``, ``return_mode`` (``"project"`` or ``"anneal"``), ``free_phase``,
    ``accept``, ``sites`` (not ``"auto"``), ``width``, ``activation``, ``exclude``,
    ``overrides``, ``seed``, ``init_scale``, ``extension_options``, ``extension_lr_scale``,
    ``min_lr_fraction``, ``max_cycles``, ``on_failure``, ``verbose``, ``shadow`` and
    ``probation_steps`` (plain training beside a cycle, and beside the run after a kept one:
    :mod:`~morphc.integrations.trainer_probation`).
    """

    def __init__(self, trigger: Trigger | None = None, *, window: int | None = None,
                 **options) -> None:
        unsupported = {k: _NOT_HERE[k] for k in options if k in _NOT_HERE}
        if unsupported:
            raise BypassError(f"not available inside a trainer: {unsupported}")
        try:
            self.config = BypassConfig(**one_exclude_pattern(options))
        except TypeError as exc:
            known = sorted(set(BypassConfig.__dataclass_fields__) - set(_NOT_HERE))
            raise BypassError(f"{exc}; settings: {known}") from None
        cfg = self.config
        check_branch_settings(cfg)
        if cfg.return_mode is ReturnMode.PENALTY:
            raise BypassError(f"return_mode='penalty' is {_NOT_HERE['penalty']} in a trainer; "
                              "use 'project' (default) or 'anneal'")
        if isinstance(cfg.sites, str) and cfg.sites == "auto":
            raise BypassError("sites='auto' is not available in a trainer; pass 'all', names, "
                              "patterns or a predicate")
        self.trigger = trigger if trigger is not None else Plateau()
        if not isinstance(self.trigger, Trigger):
            raise BypassError(f"trigger must be a morphc.Trigger, got {type(trigger).__name__}")
        self.window = int(window) if window is not None else max(1, min(20, cfg.return_steps))
        if self.window < 1:
            raise BypassError(f"window must be >= 1, got {window}")
        self.log = EventLog(cfg.verbose)
        self.model: nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self._cycle: Cycle | None = None
        self._plain: deque[float] = deque(maxlen=self.window)
        self._sign = 1.0                  # -1 for a maximize=True optimizer (attach)
        self._cycle_losses: list[float] = []
        self._pending: list[float] = []
        self._shares: list[bool] = []
        self._handles: list = []
        self._micro = 0
        self._free_buffers: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.step_count, self.cycle, self.failures = 0, 0, 0
        self._unpaid, self._quiet_until, self._peak_lr = 0, 0, 0.0
        self._lr_seen, self._lr_changed_at = 0.0, 0
        self._lr_scale = float(self.config.extension_lr_scale)
        self._disabled: str | None = None
        self._replay: Replay | None = None       # the callback's: a micro-batch run again
        self._clip = None                         # the trainer's gradient clipping
        self._beside: PlainBeside | None = None   # plain training beside the cycle in flight
        self._probation: TrainerProbation | None = None   # ... or beside a kept cycle's run
        self._inputs: list = []                   # this step's micro-batches, for it
        self._step_groups: list[dict] = []        # the user's groups' settings for this step
        self._stepped = False     # optimizer.step() ran; after_step (the step's end) not yet
        self._ended_early = False  # resolve() ended this step's cycle before after_step
        self._versions = None      # on probation: each weight's version (edits between steps)
        self._warned_edited = False

    # -- joining and leaving the trainer ---------------------------------------------------------
    def attach(self, model: nn.Module, optimizer, *, max_grad_norm: float | None = None,
               total_steps: int | None = None, step: int = 0, replay: Replay | None = None,
               clip_plain=None) -> None:
        """Start watching: find the sites (errors now, not mid-training) and hook the optimizer.
        ``max_grad_norm``: clip the extension's gradients in the step pre-hook (for trainers
        that clip ``model.parameters()`` before ``optimizer.step()``, e.g. HF's). ``replay``:
        runs a micro-batch given to :meth:`record_inputs` again and returns ``(loss, share)``,
        so plain training can step beside a cycle; ``clip_plain()``: the trainer's clipping of
        the gradients it leaves."""
        if self._probation is not None or self._cycle is not None:   # left by a run that
            if self.model is model:                                      # never reached its end
                self.resolve("training started again")
            self._probation, self._beside, self._inputs = None, None, []
        refused = already_extended(model, "a trainer's Bypass callback")
        if refused:
            raise BypassError(refused)
        self.detach()
        self.model, self.optimizer = model, raw_optimizer(optimizer)
        self._replay, self._clip = replay, clip_plain
        self.max_grad_norm = max_grad_norm if max_grad_norm and max_grad_norm > 0 else None
        self.config.total_steps = total_steps if total_steps and total_steps > 0 else None
        self.step_count = int(step)
        self._table, self._modules = module_sites(model)
        frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
        if not self._table.extendable():
            raise SiteError(f"{type(model).__name__} has no site a trainer integration can "
                            f"extend: {self._table.explain()}")
        self._chosen = select_sites(self._table, self.config.sites, self.config.exclude, frozen)
        self._sign = loss_sign(self.optimizer)   # recorded values judged as losses to minimise
        self._peak_lr = float(training_group(self.optimizer).get("lr", 0.0))
        self._lr_seen, self._lr_changed_at = self._peak_lr, self.step_count
        # on every submodule: a load into one (PEFT's load_adapter into the PeftModel inside a
        # LightningModule) never runs its parents' load hooks; TorchScript submodules take none
        self._handles = [self.optimizer.register_step_pre_hook(self._pre_step),
                         self.optimizer.register_step_post_hook(self._post_step),
                         *(m.register_load_state_dict_pre_hook(self._before_load)
                           for m in model.modules()
                           if not isinstance(m, torch.jit.ScriptModule))]

    def _before_load(self, module, state_dict, prefix, *args) -> None:
        """Weights loaded into the model or any submodule of it mid-cycle (HF's
        ``load_best_model_at_end`` after a run stopped mid-cycle, a callback restoring a
        checkpoint, PEFT's ``load_adapter``): resolve the cycle first, or resolving it afterwards
        — at a miss or the end of training — overwrites what was loaded. (Fires once per load:
        at the module it was called on, whose prefix is empty.)"""
        if not prefix:
            self.resolve("weights were loaded into the model")

    def detach(self) -> None:
        """Stop watching (a cycle in flight must be resolved first: see :meth:`finish`)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def finish(self) -> None:
        """End of training: resolve a cycle in flight, unhook. The model is the user's own."""
        self.resolve("training ended")
        self.detach()

    # -- what the trainer's loop reports ---------------------------------------------------------
    @property
    def in_cycle(self) -> bool:
        return self._cycle is not None

    @property
    def phase(self) -> Phase:
        return Phase.TRAIN if self._cycle is None else self._cycle.phase

    @property
    def extended(self) -> InPlaceExtension | None:
        return None if self._cycle is None else self._cycle.ext

    @property
    def history(self) -> list[dict]:
        return self.log.events

    @property
    def wants_inputs(self) -> bool:
        """Whether plain training beside a cycle (or its probation) needs this step's
        micro-batches."""
        return self._beside is not None

    def record_inputs(self, inputs) -> None:
        """A micro-batch about to run (whatever ``replay`` takes), with the RNG state it will
        draw from, for plain training's step beside the cycle."""
        if self._beside is not None:
            self._inputs.append((self._beside.rng_state(), inputs))

    def before_micro_batch(self) -> None:
        """A forward/backward is about to run: in a joint free phase, alternate s = 1 / 0."""
        self._restore_free_buffers()
        cycle = self._cycle
        if cycle is None or cycle.phase is not Phase.BYPASS:
            return
        joint = self.config.free_phase is FreePhase.JOINT
        s = 0.0 if joint and self._micro % 2 else 1.0
        cycle.ext.set_homotopy(s)
        self._micro += 1
        if joint and s == 1.0:     # the s = 1 pass must not move BN statistics: they belong
            self._free_buffers = [(b, b.detach().clone()) for b in self.model.buffers()]

    def _restore_free_buffers(self) -> None:
        """After the s = 1 micro-batch's backward (autograd may have saved the buffers):
        put back the statistics from before its forward, as Bypass's joint step does."""
        saved, self._free_buffers = self._free_buffers, []
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)

    def record_loss(self, value, *, share: bool = False) -> None:
        """One micro-batch's training loss (a tensor or a number). ``share=True``: the loss is
        already this micro-batch's share of the step's loss (normalised over the items of the
        whole accumulated step, as transformers does with ``num_items_in_batch``), so the step's
        loss is the sum of the shares, not their mean."""
        self._pending.append(float(value.detach()) if isinstance(value, torch.Tensor)
                             else float(value))
        self._shares.append(bool(share))

    def after_step(self, step: int) -> None:
        """An optimizer step is done (grads consumed, scheduler stepped): drive the cycle."""
        if not self._pending:
            raise BypassError("no training loss was recorded for this optimizer step: the "
                              "trainer integration reads it from the model's output (.loss / "
                              "['loss']) or the training step's output; return the loss there, or "
                              "where you compute it yourself (e.g. a Trainer.training_step "
                              "override that does not call compute_loss) call "
                              "callback.bypass.record_loss(loss) once per micro-batch")
        self._stepped = False
        if self._ended_early:     # resolve() already took this step's cycle (and plain) step
            self._ended_early = False
            self._pending.clear()
            self._shares.clear()
            self.step_count = int(step)
            return
        value = self._pending_value()
        self._pending.clear()
        self._shares.clear()
        self.step_count = int(step)
        inputs, self._inputs = self._inputs, []
        if self._cycle is not None:
            self._step_beside(inputs)
            self._cycle_step(value)
        elif self._probation is not None:
            self._probation_step(value, inputs)
        else:
            self._plain_step(value)
        self._count_versions()

    def _pending_value(self) -> float:
        """This step's training loss, from its micro-batches' recorded losses."""
        value = self._sign * sum(self._pending)
        return value if all(self._shares) else value / len(self._pending)

    # -- the optimizer's step hooks: the extension's group joins only inside step() --------------
    def _pre_step(self, optimizer, args, kwargs) -> None:
        self._restore_free_buffers()
        self._ended_by_edit()             # on probation: an edit since the last step's end
        cycle = self._cycle
        if cycle is None and self._beside is None:
            return
        # the settings the scheduler gave the user's groups for this step, for plain training's
        self._step_groups = [{k: v for k, v in g.items() if k != "params"}
                             for g in optimizer.param_groups]
        if cycle is None:                 # on probation: no extension to attach
            return
        group, cfg = cycle.group, self.config
        if "lr" not in cfg.extension_options:
            group.group["lr"] = self._lr_scale * float(training_group(optimizer)["lr"])
        clip(group.params, self.max_grad_norm)
        group.attach()

    def _post_step(self, optimizer, args, kwargs) -> None:
        self._stepped = True
        self._count_versions()            # the step's own change is not an edit
        cycle = self._cycle
        if cycle is not None and cycle.group.attached:
            cycle.group.detach()
            cycle.group.zero_grad()   # the trainer zeroes only its own groups' gradients

    # -- plain steps (a cycle starts in trainer_cycle.TrainerCycle) -------------------------------
    def _plain_step(self, value: float) -> None:
        if math.isfinite(value):
            self._plain.append(value)
        lr = float(training_group(self.optimizer).get("lr", 0.0))
        self._peak_lr = max(self._peak_lr, lr)
        if lr != self._lr_seen:
            self._lr_seen, self._lr_changed_at = lr, self.step_count
        fired = self.trigger.update(value, step=self.step_count, grad_norm=None)
        idle = self._disabled is None and self._probation is None   # no cycle on probation
        if fired and idle and self._plain and may_start(
                self.config, self.trigger, step=self.step_count, cycles=self.cycle,
                quiet_until=self._quiet_until, lr=lr, peak_lr=self._peak_lr,
                lr_changed_at=self._lr_changed_at):
            self._start_cycle()

    def _event(self, kind: str, **fields) -> None:
        self.log.add(kind, step=self.step_count, phase=self.phase, cycle=self.cycle, **fields)

    # -- the callback's own checkpoint state (no cycle or probation is ever in one) -------------
    def state_dict(self) -> dict:
        return {"trigger": self.trigger.state_dict(), "cycle": self.cycle,
                "failures": self.failures, "unpaid": self._unpaid,
                "quiet_until": self._quiet_until, "peak_lr": self._peak_lr,
                "lr_seen": self._lr_seen, "lr_changed_at": self._lr_changed_at,
                "lr_scale": self._lr_scale, "disabled": self._disabled, "plain": list(self._plain),
                "history": list(self.history)}

    def load_state_dict(self, state: dict) -> None:
        if self._probation is not None:       # resuming: judge it, leave nothing in flight
            self.resolve("a checkpoint was loaded")
        self.trigger.load_state_dict(state["trigger"])
        self.cycle, self.failures = int(state["cycle"]), int(state["failures"])
        self._unpaid, self._quiet_until = int(state["unpaid"]), int(state["quiet_until"])
        self._peak_lr, self._disabled = float(state["peak_lr"]), state["disabled"]
        self._lr_seen = float(state.get("lr_seen", self._peak_lr))
        self._lr_changed_at = int(state.get("lr_changed_at", self.step_count))
        self._lr_scale = float(state.get("lr_scale", self.config.extension_lr_scale))
        self._plain.clear()
        self._plain.extend(float(v) for v in state["plain"])
        self.log.events[:] = list(state["history"])
