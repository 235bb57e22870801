"""Plain training beside a cycle, so that a cycle which does not pay costs the user nothing.

A rollback restores the model from before the cycle, and the steps the cycle took are lost: a run
that still improves slowly ends behind plain training by a cycle's steps per miss (measured on
the unseen problems, docs/benchmarks.md). The shadow is a copy of the user's model and optimizer,
taken when a cycle starts, that takes plain training's step on every batch the cycle sees. A cycle
that does not beat it hands the user the shadow's state — where plain training would be now, bit
for bit — instead of the state from before the cycle.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
from collections.abc import Callable

import torch
from torch import nn

from morphc.compiler.deviation import cuda_devices
from morphc.ir.settings import setting_names
from morphc.runtime.outside_buffers import outside_buffers_kept
from morphc.runtime.shadow_copies import (
    copied_parameters,
    copied_tensor,
    copy_grad_hooks,
    copy_step_hooks,
    put_state,
    swap_states,
)
from morphc.runtime.snapshot import model_structure, trained_outside
from morphc.runtime.steps import (
    Closure,
    NonFinite,
    backward_checked,
    check_finite,
    clip,
    loss_of,
    put_back,
    zero_grads,
)


def plain_leads(mine: float, plain: float) -> bool:
    """Whether plain training beside a run ends up ahead of it (a probation's verdict): a finite
    loss below the run's, or the run's is not finite."""
    return math.isfinite(plain) and (plain < mine or not math.isfinite(mine))


def plain_catches_up(lead_before: float | None, lead: float) -> bool:
    """Whether plain training, still behind the run by ``lead``, closed the gap over the last
    probation fast enough to overtake within another one at that pace: it is leaving a plateau
    the cycle's run is not (XOR at lr 0.3: a kept cycle at the 0.125 minimum, plain training
    0.25 → 0.176 over its probation and solving the problem soon after)."""
    return lead_before is not None and math.isfinite(lead_before) and math.isfinite(lead) \
        and lead_before - lead > lead


@dataclasses.dataclass
class Probation:
    """Plain training beside a kept cycle's run (a :class:`Shadow`), the step its verdict is
    due, and by how much the run led plain training when it began (None: not measured)."""

    shadow: Shadow
    until: int
    lead: float | None = None

    def state_dict(self) -> dict:
        return {"until": self.until, "lead": self.lead, "shadow": self.shadow.state_dict()}

    @classmethod
    def from_state(cls, state: dict, model: nn.Module, optimizer: torch.optim.Optimizer,
                   wrap: Callable[[nn.Module], nn.Module] | None = None) -> Probation:
        lead = state.get("lead")                        # older checkpoints: none
        return cls(Shadow.from_state(state["shadow"], model, optimizer, wrap),
                   int(state["until"]), None if lead is None else float(lead))


class Shadow:
    """The user's model and optimizer, copied at a cycle's start and trained plainly."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                 wrap: Callable[[nn.Module], nn.Module] | None = None) -> None:
        memo: dict = {}
        self.model = copy.deepcopy(model, memo)       # the optimizer's copy then steps the
        copied_parameters(model, self.model, memo)   # copied parameters (the same memo)
        self.optimizer = copy.deepcopy(optimizer, memo)
        self.pairs = [(param, memo[id(param)]) for param in model.parameters()]
        self.inside = list(self.pairs)
        # a closure that reads the user's own weights besides calling its module (a penalty
        # over model.parameters(), EWC): found at the first step, and from then on the copy's
        # values stand in the user's weights too whenever the copy runs
        self.reads_user = False
        # parameters the optimizer trains outside the model (a loss's temperature or class
        # weights): the closure reads the user's tensors, so the copy's values are swapped in
        # around every use of the copy (:meth:`plain_values`)
        self.outside = [(p, memo[id(p)]) for p in trained_outside(model, optimizer)]
        self.pairs += self.outside
        copy_grad_hooks(self.pairs)
        copy_step_hooks(optimizer, self.optimizer)
        self.buffers = list(zip(model.buffers(), self.model.buffers(), strict=True))
        self.modules = list(zip(model.modules(), self.model.modules(), strict=True))
        self.ran_modes: tuple[bool, ...] | None = None   # :meth:`modes`
        self.layers = [(user, mine, names) for user, mine in zip(
            model.modules(), self.model.modules(), strict=True) if (names := setting_names(user))]
        # made once: the shadow steps on every step of a cycle
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]
        self.backup = [mine.detach().clone() for _, mine in self.buffers]
        self.devices = cuda_devices(model)
        self.skipped = False      # the last step found a non-finite loss or gradient: untouched
        self.structure = model_structure(model)   # a layer the user replaces later: no follow
        # what plain training's steps call: the copy compiled as the user's model is (eager
        # kernels round differently from inductor's), else the copy itself
        self.run = self.model if wrap is None else wrap(self.model)
        self.parked: list[torch.Tensor] | None = None   # the run's values while plain's show
        self.parked_state: list[dict | None] = []      # ... and the run's optimizer state
        self.showing = False
        # on probation the run is the user's and its step moves the statistics of modules the
        # closure runs outside the model (:mod:`~morphc.runtime.outside_buffers`); this one not
        self.keep_outside = False

    # -- between steps: the user's tensors show plain training ----------------------------------
    def show_plain(self, optimizer: torch.optim.Optimizer) -> None:
        """Between steps of a cycle, plain training's values in the user's tensors and its
        per-parameter state in the user's ``optimizer``, the run's set aside: what the user
        reads there (a validation metric, an EMA, early stopping, a checkpoint of model and
        optimizer) is what it would be without Bypass, so what they decide on it is too.
        :meth:`show_run` puts the run's back at the next step."""
        mirrored = self.pairs + self.buffers
        if self.showing or any(u.dtype != m.dtype or u.device != m.device or u.shape != m.shape
                               for u, m in mirrored):
            return
        with torch.no_grad():
            if self.parked is None or len(self.parked) != len(mirrored):   # a tensor joined
                self.parked = [user.detach().clone() for user, _ in mirrored]
            else:
                torch._foreach_copy_(self.parked, [user.detach() for user, _ in mirrored])
            torch._foreach_copy_([user.detach() for user, _ in mirrored],
                                 [mine.detach() for _, mine in mirrored])
        self.parked_state = swap_states(optimizer.state, self.pairs, self.optimizer.state)
        self.showing = True

    def show_run(self, optimizer: torch.optim.Optimizer, changed: bool) -> None:
        """The run's values and optimizer state back in the user's tensors and optimizer.
        ``changed``: the user changed them in the meantime (a clamp, a load into a layer,
        statistics moved by a forward in training mode) — done to plain training's values, so
        plain training keeps it, as without Bypass (an optimizer state edited in place is
        plain training's own: it is the copy's, shown)."""
        if not self.showing:
            return
        shown = [optimizer.state.get(param) for param, _ in self.pairs]
        for (param, _), run in zip(self.pairs, self.parked_state, strict=True):
            put_state(optimizer.state, param, run)
        for (_, mine), plain in zip(self.pairs, shown, strict=True):
            put_state(self.optimizer.state, mine, plain)
        self.parked_state = []
        mirrored = self.pairs + self.buffers
        with torch.no_grad():
            users = [user.detach() for user, _ in mirrored]
            if changed:
                torch._foreach_copy_([mine.detach() for _, mine in mirrored], users)
            torch._foreach_copy_(users, self.parked)
        self.showing = False

    def run_optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict:
        """``optimizer.state_dict()`` with the run's state where plain's is showing."""
        if not self.showing:
            return optimizer.state_dict()
        shown = [optimizer.state.get(param) for param, _ in self.pairs]
        for (param, _), run in zip(self.pairs, self.parked_state, strict=True):
            put_state(optimizer.state, param, run)
        try:
            return optimizer.state_dict()
        finally:
            for (param, _), plain in zip(self.pairs, shown, strict=True):
                put_state(optimizer.state, param, plain)

    def run_values(self) -> dict[int, torch.Tensor]:
        """While plain's values show: the run's, by the id of the user's tensor."""
        if not self.showing:
            return {}
        return {id(user): value for (user, _), value in zip(self.pairs + self.buffers,
                                                              self.parked, strict=True)}

    def follows(self, optimizer: torch.optim.Optimizer) -> bool:
        """Whether the shadow can keep taking the user's steps: the same param groups. A group
        the user added mid-cycle joins here too, over the copies of its parameters (unfreezing
        a layer) — a tensor outside the model (a new head the closure runs) is copied now, as
        it is: it has not been stepped yet, so its value is plain training's. A model the user
        converted (``model.double()``, ``.to(device)``) has no counterpart: the copy's tensors
        are of the old dtype and device, it would fail the user's batch and could not be
        handed over."""
        if any(param.dtype != mine.dtype or param.device != mine.device
               for param, mine in self.pairs):
            return False
        added = optimizer.param_groups[len(self.optimizer.param_groups):]
        if not added:
            return len(optimizer.param_groups) == len(self.optimizer.param_groups)
        copies = dict(self.pairs)
        new = [p for g in added for p in g["params"] if p not in copies]
        if any(p in optimizer.state for p in new):   # stepped already: plain's value is lost
            return False
        for param in dict.fromkeys(new):
            copies[param] = copied_tensor(param)
            self.outside.append((param, copies[param]))
            self.pairs.append((param, copies[param]))
            copy_grad_hooks([(param, copies[param])])
        for group in added:
            self.optimizer.add_param_group({**{k: v for k, v in group.items() if k != "params"},
                                            "params": [copies[p] for p in group["params"]]})
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]
        return True

    def step(self, closure: Closure, optimizer: torch.optim.Optimizer | None,
             max_grad_norm: float | None) -> torch.Tensor:
        """Plain training's step on this batch, as ``Bypass`` takes it outside a cycle: the
        user's current hyperparameters, read from ``optimizer`` (a scheduler moves them; None:
        keep those of the copy), a non-finite loss or gradient skipped with the buffers put
        back (``skipped``). Returns the loss (detached)."""
        self.skipped = False
        for group, mine in zip(optimizer.param_groups if optimizer is not None else (),
                               self.optimizer.param_groups, strict=False):
            mine.update((k, v) for k, v in group.items() if k != "params")
        for param, mine in self.pairs:      # a layer the user froze or unfroze mid-cycle
            if mine.requires_grad != param.requires_grad:
                mine.requires_grad_(param.requires_grad)
        self._follow_settings()
        self.follow_modes()
        self.optimizer.zero_grad(set_to_none=True)
        buffers = [mine for _, mine in self.buffers]
        if buffers:
            with torch.no_grad():
                torch._foreach_copy_(self.backup, buffers)
        for param, _ in self.swapped() + self.inside:   # the user's last step's (the user's
            param.grad = None                           # own step zeroes them before its own)
        rng = None if self.reads_user else self._rng_state()
        self.ran_modes = None
        noted = None if self.run is not self.model else \
            self.model.register_forward_pre_hook(self._note_modes)   # compiled: not traced in
        try:
            loss = self._loss_and_grads(closure)
            if not self.reads_user and any(p.grad is not None for p, _ in self.inside):
                self.reads_user = True      # the closure differentiated the user's weights:
                zero_grads(self.params)     # again, from the same RNG and buffers, with the
                zero_grads([p for p, _ in self.inside])   # copy's values in them
                put_back(buffers, self.backup)
                self._set_rng_state(rng)
                loss = self._loss_and_grads(closure)
        except NonFinite as exc:
            zero_grads(self.params)
            put_back(buffers, self.backup)
            self.skipped = True
            return exc.loss
        except BaseException:      # the closure failed: plain training would not have moved
            zero_grads(self.params)
            put_back(buffers, self.backup)
            raise
        finally:
            if noted is not None:
                noted.remove()
        clip(self.params, max_grad_norm)
        self.optimizer.step()
        return loss.detach()

    def _follow_settings(self) -> None:
        """The settings of the user's layers on their copies (a dropout schedule's
        ``model.drop.p = 0.1`` between steps): plain training runs with what the user set."""
        for user, mine, names in self.layers:
            for key in names:
                value = vars(user).get(key)
                if vars(mine).get(key) != value:
                    setattr(mine, key, value)

    def follow_modes(self) -> None:
        """The train/eval mode of each user's layer on its copy (a validation's
        ``model.eval()`` between steps, BatchNorm frozen with ``model.bn.eval()``): the closure
        then runs the copy from the modes plain training's model is in, as it runs the user's."""
        for user, mine in self.modules:
            if mine.training != user.training:
                mine.training = user.training

    def modes(self) -> tuple[bool, ...]:
        """The modes the last step ran the copy in, layer by layer in the user's order (as
        its first call found them; compiled, as the closure left them)."""
        if self.ran_modes is not None:
            return self.ran_modes
        return tuple(mine.training for _, mine in self.modules)

    def _note_modes(self, *_) -> None:
        if self.ran_modes is None:
            self.ran_modes = tuple(mine.training for _, mine in self.modules)

    def _loss_and_grads(self, closure: Closure) -> torch.Tensor:
        """The closure on the copy, its backward, the gradients on the copy's tensors; raises
        :class:`NonFinite` (its ``loss``: the detached loss) before anything is stepped."""
        with self.plain_values(), outside_buffers_kept(self.model, enabled=self.keep_outside):
            loss, value = loss_of(closure, self.run)
            try:
                backward_checked(loss, value)
                self._move_grads()
                check_finite(self.params)
            except NonFinite as exc:
                exc.loss = loss.detach()
                raise
        return loss.detach()

    def _rng_state(self) -> list[torch.Tensor]:
        return [torch.get_rng_state(), *(torch.cuda.get_rng_state(d) for d in self.devices)]

    def _set_rng_state(self, state: list[torch.Tensor]) -> None:
        torch.set_rng_state(state[0])
        for device, value in zip(self.devices, state[1:], strict=True):
            torch.cuda.set_rng_state(value, device)

    def swapped(self) -> list:
        """The user's tensors the closure reads besides its module, paired with the copy's:
        those outside the model, and the model's own once the closure turned out to read them."""
        return self.pairs if self.reads_user else self.outside

    @contextlib.contextmanager
    def plain_values(self):
        """The copy's values in the user's tensors the closure reads besides its module
        (:meth:`swapped`), for as long as the copy runs (its step, its evaluation); the user's
        values back afterwards."""
        swapped = self.swapped()
        if not swapped:
            yield
            return
        with torch.no_grad():
            kept = [param.detach().clone() for param, _ in swapped]
            for param, mine in swapped:
                param.copy_(mine)
        try:
            yield
        finally:
            with torch.no_grad():
                for (param, _), value in zip(swapped, kept, strict=True):
                    param.copy_(value)

    def _move_grads(self) -> None:
        """The gradient the copy's backward left on a user's tensor belongs to the copy's
        counterpart, which its optimizer steps (added to the one its module gave it)."""
        for param, mine in self.swapped():
            if param.grad is None:
                continue
            if mine.grad is None:
                mine.grad = param.grad
            else:
                mine.grad.add_(param.grad)
            param.grad = None

    def rng_apart(self) -> contextlib.AbstractContextManager:
        """A fork of the global RNGs (CPU and the model's CUDA devices) for the step beside
        the shadow's: the shadow draws from them exactly as plain training would."""
        return torch.random.fork_rng(devices=self.devices)

    def hand_over(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Put the shadow's parameters, buffers and optimizer state into the user's own tensors
        (the optimizer, hooks and any compiled graph keep pointing at them)."""
        with torch.no_grad():
            for param, mine in self.pairs:
                param.copy_(mine)
                if mine in self.optimizer.state:
                    optimizer.state[param] = self.optimizer.state.pop(mine)
                else:
                    optimizer.state.pop(param, None)
            for buf, mine in self.buffers:
                buf.copy_(mine)

    # -- checkpoints ----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}

    @classmethod
    def from_state(cls, state: dict, model: nn.Module, optimizer: torch.optim.Optimizer,
                   wrap: Callable[[nn.Module], nn.Module] | None = None) -> Shadow:
        shadow = cls(model, optimizer, wrap)
        shadow.model.load_state_dict(state["model"])
        shadow.optimizer.load_state_dict(state["optimizer"])
        return shadow
