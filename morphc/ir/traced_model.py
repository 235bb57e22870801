"""``TracedModel``: a graph of the user's model plus how it was obtained, and how it is called.

Kept apart from the frontends (:mod:`morphc.ir.frontends`, :mod:`morphc.ir.trace`) because
everything above ``ir`` holds a ``TracedModel`` and calls its graph, while only ``trace`` makes
one: what an exported graph accepts (shapes, the structure of its inputs) is checked here, on
every call, long after tracing ended.
"""

from __future__ import annotations

import inspect
import weakref
from dataclasses import dataclass, field

import torch
from torch import fx, nn

from morphc.errors import ShapeError
from morphc.ir.example_inputs import describe_inputs
from morphc.ir.python_numbers import baked_numbers, changed_number, value_guard_error
from morphc.ir.shapes import DimRange, Specialisation, check_call, guard_error, input_labels


@dataclass
class TracedModel:
    """A graph of the user's model plus how it was obtained.

    ``example_inputs`` are the positional example inputs, ``example_kwargs`` the keyword ones.
    For the export frontend, ``input_dims`` says what each tensor input dimension accepts and
    ``specialised`` lists each dimension torch.export fixed, with the reason.
    """

    graph_module: fx.GraphModule
    frontend: str
    reason: str
    example_inputs: tuple
    training: bool
    dynamic_batch: bool | None = None
    notes: list[str] = field(default_factory=list)
    example_kwargs: dict = field(default_factory=dict)
    dynamic_shapes: object = None
    specialised: list[Specialisation] = field(default_factory=list)
    input_dims: list[DimRange] = field(default_factory=list)
    input_names: list[str] = field(default_factory=list)   # the forward's parameter names
    trace_seconds: float = 0.0
    number_defaults: dict = field(default_factory=dict)   # forward's Python-number defaults
    cached: bool = False
    _signatures: weakref.WeakKeyDictionary = field(default_factory=weakref.WeakKeyDictionary,
                                                   repr=False, compare=False)
    _baked: dict | None = field(default=None, repr=False, compare=False)   # python_numbers

    def __getstate__(self) -> dict:
        """Pickle (``torch.save`` of an extended model) without the per-module signature cache,
        a WeakKeyDictionary pickle cannot take; it refills on the first call."""
        return {**self.__dict__, "_signatures": None}

    def __setstate__(self, state: dict) -> None:
        state.setdefault("number_defaults", {})     # pickled before it existed
        self.__dict__.update(state, _signatures=weakref.WeakKeyDictionary(), _baked=None)

    def check_call(self, args: tuple, kwargs: dict) -> dict:
        """Refuse, with a ``ShapeError``, inputs the graph cannot take — a Python number that
        differs from the one torch.export baked in is said to be one before any guard speaks of
        shapes; returns the kwargs with non-tensor example kwargs (e.g. ``use_cache=False``,
        baked into an exported graph) filled in where the call omits them."""
        if self.frontend != "export":
            return kwargs
        positional = {n for n in self.input_names[:len(args)] if not n.startswith("*")}
        filled = {k: v for k, v in self.example_kwargs.items()
                  if k not in kwargs and k not in positional and not isinstance(v, torch.Tensor)}
        kwargs = {**kwargs, **filled} if filled else kwargs
        if self._baked is None:         # the same for every call: computed once
            self._baked = baked_numbers(self.input_names,
                                        (self.example_inputs, self.example_kwargs),
                                        self.number_defaults)
        changed = changed_number(self.input_names, self._baked, args, kwargs)
        if changed is not None:
            raise changed
        if self.input_dims:
            check_call(self.input_dims, input_labels(self.input_names, args, kwargs))
        return kwargs

    def call(self, module: nn.Module, args: tuple, kwargs: dict):
        """``module(*args, **kwargs)`` for a graph of this trace, shape errors typed."""
        kwargs = self.check_call(args, kwargs)
        self._check_structure(module, args, kwargs)
        try:
            return module(*args, **kwargs)
        except AssertionError as exc:
            if str(exc).strip().startswith("Guard failed"):
                raise (value_guard_error(str(exc).strip()) or guard_error(exc)) from exc
            raise

    def _check_structure(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """An exported graph takes the inputs the example gave and no others (an optional
        input left out or None is baked in): a call that gives others is a ``ShapeError`` —
        which the extended model answers by tracing again — not a bare ``TypeError``.
        A symbolically traced graph took every ``if target is not None`` branch the example's
        tensor took: only None (given, or left to its default) where the example gave a
        tensor is refused there."""
        known = self._signatures.get(module)
        if known is None:
            known = self._signatures[module] = self._example_kinds(module)
        signature, kinds = known
        exported = self.frontend == "export"
        if signature is None or (not exported and not kinds):
            return
        try:
            bound = signature.bind(*args, **kwargs)
            if not exported:
                bound.apply_defaults()
            problem = next((f"{name!r} is {_kind(value)}, the example's is {kinds[name]}"
                            for name, value in bound.arguments.items()
                            if name in kinds and _kind(value) != kinds[name] and
                            (exported or value is None)), None)
        except TypeError as exc:
            problem = str(exc) if exported else None
        if problem is not None:
            raise ShapeError(
                f"inputs {describe_inputs(args, kwargs)} differ in structure from the example "
                f"inputs {describe_inputs(self.example_inputs, self.example_kwargs)} that "
                f"{'torch.export' if exported else 'symbolic_trace'} traced ({problem}): "
                + ("an exported graph takes exactly the inputs the example gave, and computes "
                   "as if an input that was None is still None" if exported else
                   "the graph computes as if an input the example gave is still given")
                + ". To allow it: extend with example inputs that give the same inputs as your "
                "calls (None where you pass None)")

    def _example_kinds(self, module: nn.Module) -> tuple:
        """The forward's signature and what the example gave each input (export: all of them;
        symbolic_trace: only the tensors given for an input that defaults to None, the only
        ones whose absence the graph does not follow), or (None, {}) when unreadable."""
        try:
            signature = inspect.signature(module.forward)
            example = signature.bind(*self.example_inputs, **self.example_kwargs).arguments
        except (TypeError, ValueError):   # not a signature this check can read: skip it
            return None, {}
        if self.frontend != "export":
            example = {k: v for k, v in example.items() if isinstance(v, torch.Tensor) and
                       signature.parameters[k].default is None}
        return signature, {k: _kind(v) for k, v in example.items()}


def _kind(value) -> str:
    """What torch.export bakes in about an input: None, a tensor, or another value (whose
    value the graph guards on)."""
    return "None" if value is None else "a tensor" if isinstance(value, torch.Tensor) \
        else "a value"
