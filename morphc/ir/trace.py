"""Frontends: turn a user's ``nn.Module`` into a ``torch.fx.GraphModule``.

``torch.fx.symbolic_trace`` is tried first (cheap, keeps ``call_module`` nodes that name the user's
submodules); when it fails, typically on data-dependent control flow, ``torch.export`` is used
(its graph names every parameter by its qualified name), with positional *and* keyword inputs and
torch.export's own ``dynamic_shapes`` — by default every dimension of every tensor input is
``Dim.AUTO``, and the result reports each dimension export had to fix and why
(:mod:`morphc.ir.shapes`). Whichever ran, the resulting graph module holds the user's *own*
Parameter and buffer objects, so training it trains the user's model.

Before tracing, the model runs once on the example inputs, so a wrong input is reported as such
and not as a tracing failure. Traces are cached per model object and input signature: extending
the same model again (a Bypass cycle, a sweep over widths) does not re-export.

This module decides which frontend runs and why; how each is driven is
:mod:`morphc.ir.frontends`, what a trace is :mod:`morphc.ir.traced_model`.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import sys
import time
import warnings
import weakref
from collections.abc import Mapping

import torch
from torch import nn

from morphc.errors import ShapeError, TraceError
from morphc.ir.example_inputs import ExampleInputs, as_tuple, first_line, run_example
from morphc.ir.failure_site import loss_hint, model_line
from morphc.ir.frontends import (
    Unrecordable,
    _SiteAwareTracer,  # noqa: F401  extended models pickled before the frontends moved name it here
    fast_path_notes,
    has_forward_hooks,
    hook_notes,
    trace_export,
    trace_symbolic,
)
from morphc.ir.settings import module_settings
from morphc.ir.traced_model import TracedModel

FRONTENDS = ("auto", "symbolic_trace", "export")


def _unflattenable(output) -> list[str]:
    """Type names of output leaves torch.export cannot return (e.g. ``DynamicCache``)."""
    leaves = torch.utils._pytree.tree_leaves(output)
    return sorted({type(x).__name__ for x in leaves
                   if not isinstance(x, torch.Tensor | int | float | bool | str | type(None))})


def _object_inputs(model: nn.Module, args: tuple, kwargs: dict) -> str:
    """The inputs that hold objects torch.export cannot flatten (a ``DynamicCache`` given as
    ``past_key_values``, an unregistered dataclass), as ``"past_key_values is a DynamicCache"``;
    empty when there are none."""
    try:
        named = inspect.signature(model.forward).bind_partial(*args, **kwargs).arguments
    except (TypeError, ValueError):
        named = {**{f"input {i}": a for i, a in enumerate(args)}, **kwargs}
    found = [f"{name} is a {' and '.join(bad)}" for name, value in named.items()
             for bad in [_unflattenable(value)] if bad]
    return "; ".join(found)


def _object_input_hint(objects: str) -> str:
    if "Cache" in objects:
        return ("A cache is for generating token by token, not for training: extend with the "
                "inputs of a whole forward (the full sequence, no past_key_values, "
                "use_cache=False), which is what Bypass trains on.")
    return ("Pass tensors (or containers of them), or register the input's class once before "
            "extending: torch.utils._pytree.register_dataclass(YourClass).")


def _run_once(model: nn.Module, args: tuple, kwargs: dict) -> dict:
    """Run the model on the example inputs; returns the kwargs to trace with."""
    output = run_example(model, args, kwargs)
    bad = _unflattenable(output)
    if not bad:
        return kwargs
    caches = [b for b in bad if "Cache" in b]
    has_flag = "use_cache" in inspect.signature(model.forward).parameters
    if caches and has_flag and "use_cache" not in kwargs:
        return {**kwargs, "use_cache": False}
    classes = sorted({type(x).__name__ for x in torch.utils._pytree.tree_leaves(output)
                      if dataclasses.is_dataclass(x) and not isinstance(x, type)})
    hint = ("pass use_cache=False in kwargs (or set model.config.use_cache = False)" if caches
            else "register each output dataclass once, before extending: "
            + "; ".join(f"torch.utils._pytree.register_dataclass({c})" for c in classes)
            if classes else "return tensors (or register a pytree node for these types)")
    raise TraceError(f"{type(model).__name__} returns {', '.join(bad)}, which torch.export cannot "
                     f"flatten; {hint}")


_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _signature(model: nn.Module, args: tuple, kwargs: dict, dynamic_shapes, frontend) -> tuple:
    """What a trace depends on: inputs' structure, shapes and dtypes, the non-tensor values, the
    dynamic_shapes spec, every module's mode (a BatchNorm the user put in eval mode alone is
    traced as such) and settings (a Dropout's p), the identity of every parameter and buffer."""
    leaves, spec = torch.utils._pytree.tree_flatten((args, kwargs))
    described = tuple((tuple(x.shape), x.dtype, x.device) if isinstance(x, torch.Tensor)
                      else repr(x) for x in leaves)
    tensors = tuple(id(t) for t in [*model.parameters(), *model.buffers()])
    hooks = tuple((id(m), *m._forward_hooks, *m._forward_pre_hooks) for m in model.modules()
                  if has_forward_hooks(m))
    modes = tuple(m.training for m in model.modules())
    settings = tuple(module_settings(model).items())     # torch.export bakes Dropout.p in
    return (str(spec), described, repr(dynamic_shapes), frontend, modes, tensors, hooks,
            settings)


def trace(model: nn.Module, example_inputs=None, frontend: str = "auto", *, kwargs=None,
          dynamic_shapes=None, args=None, cache: bool = True) -> TracedModel:
    """Trace ``model`` into a graph; report which frontend was used and why.

    ``example_inputs`` (or ``args``) are the positional inputs, ``kwargs`` the keyword ones;
    ``dynamic_shapes`` is torch.export's own spec (default: every dimension ``Dim.AUTO``).

    >>> traced = trace(nn.Sequential(nn.Linear(4, 3), nn.ReLU()), (torch.randn(2, 4),))
    >>> traced.frontend
    'symbolic_trace'
    """
    if not isinstance(model, nn.Module):
        space = callable(getattr(model, "module", None))    # a ModelSpace holds many models
        raise TraceError(f"morphc needs an nn.Module, got {type(model).__name__}" + (
            ": pass one of its models, e.g. space.module(node) (space.best()[1] for the best "
            "scored)" if space else ""))
    if isinstance(model, torch.jit.ScriptModule):
        raise TraceError(
            f"{type(model).__name__} is TorchScript (torch.jit.script / torch.jit.trace): compiled "
            "code with no Python forward for either frontend to trace; pass the nn.Module before "
            "scripting, and script the model morphc.contract returns")
    if frontend not in FRONTENDS:
        raise TraceError(f"unknown frontend {frontend!r}; choose one of {FRONTENDS}")
    given = args if args is not None else example_inputs
    if isinstance(given, ExampleInputs):
        kwargs = {**given.kwargs, **(kwargs or {})}
        dynamic_shapes = dynamic_shapes if dynamic_shapes is not None else given.dynamic_shapes
    if kwargs is not None and not isinstance(kwargs, Mapping):
        raise TraceError(f"kwargs are the keyword inputs by name, a dict such as "
                         f"{{'attention_mask': mask}}, got {type(kwargs).__name__}; positional "
                         "inputs go in the args tuple")
    if dynamic_shapes is not None and not isinstance(dynamic_shapes, Mapping | tuple | list):
        raise TraceError(f"dynamic_shapes is torch.export's spec, a dict by input name (or a "
                         f"tuple in input order) such as {{'x': {{0: Dim.AUTO}}}}, got "
                         f"{type(dynamic_shapes).__name__}; leave it None to let morphc make "
                         "every dimension the model lets vary dynamic")
    inputs = as_tuple(given)
    kwargs = dict(kwargs or {})
    key = _signature(model, inputs, kwargs, dynamic_shapes, frontend) if cache else None
    hit = _CACHE.get(model, {}).get(key) if cache else None
    if hit is not None:
        hit.cached = True
        return hit
    started = time.perf_counter()
    traced = _trace(model, inputs, kwargs, dynamic_shapes, frontend)
    traced.trace_seconds = time.perf_counter() - started
    if cache:
        _CACHE.setdefault(model, {})[key] = traced
    return traced


def _outside_stacklevel() -> int:
    """The ``stacklevel`` of the first caller outside morphc and torch: a warning names the
    user's line whichever public function (extend, inspect, Bypass) traced."""
    level, frame = 1, sys._getframe(1)
    while frame is not None and any(os.sep + part + os.sep in frame.f_code.co_filename
                                    for part in ("morphc", "passes", "torch")):
        level, frame = level + 1, frame.f_back
    return level


def _trace(model, inputs, kwargs, dynamic_shapes, frontend) -> TracedModel:
    traced_kwargs = _run_once(model, inputs, kwargs)
    notes = [] if traced_kwargs is kwargs else [
        "use_cache=True returns a cache object torch.export cannot flatten: traced with "
        "use_cache=False (the extended model returns no cache)"]
    for note in fast_path_notes(model):
        warnings.warn(f"morphc: {note}", UserWarning, stacklevel=_outside_stacklevel())
        notes.append(note)
    symbolic_error = None
    if frontend in ("auto", "symbolic_trace") and dynamic_shapes is None:
        try:
            gm, mode_notes = trace_symbolic(model, inputs, traced_kwargs)
            return TracedModel(gm, "symbolic_trace", "torch.fx.symbolic_trace succeeded",
                               inputs, model.training, dynamic_batch=True,
                               notes=notes + hook_notes(model) + mode_notes,
                               example_kwargs=dict(traced_kwargs))
        except Unrecordable:
            raise
        except Exception as exc:  # any tracing failure means: try the next frontend
            symbolic_error = exc
            if frontend == "symbolic_trace":
                raise TraceError(
                    f"torch.fx.symbolic_trace failed ({first_line(exc)}); "
                    "use frontend='auto' or 'export'"
                ) from exc
    try:
        traced = trace_export(model, inputs, traced_kwargs, dynamic_shapes)
    except Unrecordable:
        raise
    except Exception as exc:
        tried = f"symbolic_trace: {first_line(symbolic_error)}; " if symbolic_error else ""
        objects = _object_inputs(model, inputs, traced_kwargs)
        if objects:
            raise TraceError(
                f"could not trace {type(model).__name__}: {objects}, which torch.export cannot "
                f"take as an input ({tried}torch.export: {first_line(exc)}). "
                + _object_input_hint(objects)) from exc
        line = model_line(exc)
        raise TraceError(
            f"could not trace {type(model).__name__}: {tried}torch.export: {first_line(exc)}"
            + (f" (at {line})" if line else "") + ". "
            "The model runs on the example inputs, so this is its tracing: data-dependent "
            "Python control flow (if/for on tensor values) defeats both frontends — rewrite it "
            "with torch.where / torch.cond; a dynamic_shapes spec torch.export rejects is "
            "reported here too." + loss_hint(traced_kwargs)
        ) from exc
    traced.reason = (f"symbolic_trace failed ({first_line(symbolic_error)})"
                     if symbolic_error else
                     "requested" if frontend == "export" else "dynamic_shapes given")
    traced.notes = notes + traced.notes + hook_notes(model)
    return traced


__all__ = ["FRONTENDS", "ExampleInputs", "ShapeError", "TracedModel", "trace"]
