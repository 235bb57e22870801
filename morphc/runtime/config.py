"""Every setting of a Bypass run, validated once, and the names of its phases and modes."""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from morphc.errors import BypassError


def one_exclude_pattern(options: dict) -> dict:
    """``exclude="fc1"`` is one pattern, as in ``extend``; the config would take the string as
    an iterable of patterns, one per character."""
    if isinstance(options.get("exclude"), str):
        return {**options, "exclude": (options["exclude"],)}
    return options


def no_scaler(options: dict) -> None:
    """A GradScaler passed as a setting: say why it cannot work and what does, instead of only
    listing the settings that exist."""
    if any(isinstance(v, torch.amp.GradScaler) for v in options.values()):
        raise BypassError("Bypass cannot use a GradScaler: bp.step runs the backward and the "
                          "optimizer step itself, so nothing scales the loss or unscales the "
                          "gradients. Train in bfloat16 (torch.autocast(..., dtype=torch."
                          "bfloat16) inside the closure, no scaler needed) or in float32")


class Phase(enum.StrEnum):
    TRAIN = "train"      # plain training of the user's model; the trigger watches
    BYPASS = "bypass"    # free training of the extended model
    RETURN = "return"    # taking the branches onto the constraint set C, training on


class ReturnMode(enum.StrEnum):
    PROJECT = "project"  # s = 0 at once, then train in the (linear) branch space, then fold
    ANNEAL = "anneal"    # s from 1 to exactly 0, linearly, while training
    PENALTY = "penalty"  # proximal pull of α towards C while training, then a measured snap


class FreePhase(enum.StrEnum):
    JOINT = "joint"      # every step trains L(s=1) + L(s=0): the foldable model stays good
    PLAIN = "plain"      # L(s=1) only


class Accept(enum.StrEnum):
    IF_BETTER = "if_better"   # keep a cycle only if it beats plain training's pace
    ALWAYS = "always"         # keep every cycle that contracts exactly


class OnFailure(enum.StrEnum):
    ROLLBACK = "rollback"
    RAISE = "raise"


def _choice(enum_type, name: str, value):
    try:
        return enum_type(value)
    except ValueError:
        raise BypassError(f"{name} must be one of {[m.value for m in enum_type]}, "
                          f"got {value!r}") from None


# How far a free phase that still leaves the plateau may grow by default (``"auto"``), as a
# multiple of ``bypass_steps``: the cap every measurement of the growing free phase used.
GROWTH = 4


@dataclass
class BypassConfig:
    """The settings of :class:`~morphc.Bypass` (its keyword arguments); see its docstring."""

    bypass_steps: int = 100
    max_bypass_steps: int | str | None = "auto"   # grow while it gains: "auto" 4 × bypass_steps
    return_steps: int = 100
    return_mode: ReturnMode | str = ReturnMode.PROJECT
    free_phase: FreePhase | str = FreePhase.JOINT
    accept: Accept | str = Accept.IF_BETTER
    sites: Any = "all"
    width: int | float = 8
    activation: str = "tanh"
    top_k: int | None = None
    exclude: Iterable[str] = ()
    overrides: Mapping[str, Mapping] | None = None
    probe: Any = "closure"
    lookahead_steps: int = 20         # per candidate site, for sites="auto"
    example_inputs: Any = None
    example_kwargs: Mapping | None = None
    dynamic_shapes: Any = None
    eval_closure: Callable | None = None
    judge_batches: int = 8            # without eval_closure: verdicts average this many steps'
    seed: int = 0
    init_scale: float = 1.0
    extension_options: Mapping | None = None
    extension_lr_scale: float = 1.0   # × peak lr, halved after a diverged cycle (benchmarks.md)
    min_lr_fraction: float = 0.5
    penalty: float = 10.0
    max_snap_change: float | None = None
    max_cycles: int | None = None
    total_steps: int | None = None
    on_failure: OnFailure | str = OnFailure.ROLLBACK
    max_grad_norm: float | None = None
    shadow: bool = True               # plain training beside each cycle (runtime/shadow.py)
    probation_steps: int | None = None   # ... and after a kept one (None: 2 × cycle_steps;
    # again while plain training closes in fast enough to overtake within another one)
    compile: bool = False
    compile_backend: Any = "inductor"
    compile_options: Mapping | None = None
    ddp: bool = False
    ddp_options: Mapping | None = None
    wrap: Callable | None = None
    distributed: bool | None = None
    verbose: bool = True

    def __post_init__(self) -> None:
        self.return_mode = _choice(ReturnMode, "return_mode", self.return_mode)
        self.free_phase = _choice(FreePhase, "free_phase", self.free_phase)
        self.accept = _choice(Accept, "accept", self.accept)
        self.on_failure = _choice(OnFailure, "on_failure", self.on_failure)
        for name in ("bypass_steps", "return_steps", "lookahead_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise BypassError(f"{name} must be an int >= 0, got {value!r}")
        if self.max_bypass_steps is not None and self.max_bypass_steps != "auto" and (
                isinstance(self.max_bypass_steps, bool) or
                not isinstance(self.max_bypass_steps, int) or
                self.max_bypass_steps < self.bypass_steps):
            raise BypassError(f"max_bypass_steps must be an int >= bypass_steps "
                              f"({self.bypass_steps}), 'auto' ({GROWTH} × bypass_steps) or None "
                              f"(a free phase of fixed length), got {self.max_bypass_steps!r}")
        if self.probation_steps is not None and (
                isinstance(self.probation_steps, bool) or
                not isinstance(self.probation_steps, int) or self.probation_steps < 0):
            raise BypassError(f"probation_steps must be an int >= 0 (0: none) or None (twice "
                              f"the cycle's length), got {self.probation_steps!r}")
        if self.top_k is not None and (isinstance(self.top_k, bool) or
                                       not isinstance(self.top_k, int) or self.top_k < 1):
            raise BypassError(f"top_k must be an int >= 1 or None, got {self.top_k!r}")
        if self.max_cycles is not None and self.max_cycles < 0:
            raise BypassError(f"max_cycles must be >= 0 or None, got {self.max_cycles!r}")
        for name in ("extension_lr_scale", "penalty", "init_scale"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
                raise BypassError(f"{name} must be a finite number >= 0, got {value!r}")
        if not 0.0 <= self.min_lr_fraction <= 1.0:
            raise BypassError(f"min_lr_fraction must be in [0, 1], got {self.min_lr_fraction}")
        if isinstance(self.judge_batches, bool) or not isinstance(self.judge_batches, int) or \
                self.judge_batches < 1:
            raise BypassError(f"judge_batches must be an int >= 1 (1: the last batch alone), got "
                              f"{self.judge_batches!r}")
        if self.eval_closure is not None and not callable(self.eval_closure):
            raise BypassError("eval_closure must be a callable module -> loss tensor")
        self.exclude = tuple(self.exclude)
        self.extension_options = dict(self.extension_options or {})

    @property
    def free_steps_cap(self) -> int:
        """The longest a free phase may grow (it grows only while it still gains)."""
        if self.max_bypass_steps == "auto":
            return GROWTH * self.bypass_steps
        return self.max_bypass_steps if self.max_bypass_steps is not None else \
            self.bypass_steps

    @property
    def probation_len(self) -> int:
        """How long plain training goes on beside the run after a kept cycle."""
        return self.probation_steps if self.probation_steps is not None else \
            2 * self.cycle_steps

    @property
    def cycle_steps(self) -> int:
        return self.bypass_steps + self.return_steps
