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
"""

from __future__ import annotations

import dataclasses
import inspect
import time
import weakref
from dataclasses import dataclass, field

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from morphc.errors import ShapeError, TraceError
from morphc.ir.example_inputs import (
    ExampleInputs,
    as_tuple,
    describe_inputs,
    first_line,
    run_example,
)
from morphc.ir.mode_flags import follow_mode
from morphc.ir.shapes import (
    DimRange,
    Specialisation,
    auto_dynamic_shapes,
    capture_shape_log,
    check_call,
    exported_dims,
    forward_names,
    guard_error,
    input_labels,
    specialisation_reasons,
)
from morphc.ir.untouched import attributes_kept, no_side_effects

FRONTENDS = ("auto", "symbolic_trace", "export")


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
    cached: bool = False
    _signatures: weakref.WeakKeyDictionary = field(default_factory=weakref.WeakKeyDictionary,
                                                   repr=False, compare=False)

    def __getstate__(self) -> dict:
        """Pickle (``torch.save`` of an extended model) without the per-module signature cache,
        a WeakKeyDictionary pickle cannot take; it refills on the first call."""
        return {**self.__dict__, "_signatures": None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _signatures=weakref.WeakKeyDictionary())

    def check_call(self, args: tuple, kwargs: dict) -> dict:
        """Refuse, with a ``ShapeError``, inputs the graph cannot take; returns the kwargs with
        non-tensor example kwargs (e.g. ``use_cache=False``, baked into an exported graph)
        filled in where the call omits them."""
        if self.frontend != "export":
            return kwargs
        positional = {n for n in self.input_names[:len(args)] if not n.startswith("*")}
        filled = {k: v for k, v in self.example_kwargs.items()
                  if k not in kwargs and k not in positional and not isinstance(v, torch.Tensor)}
        kwargs = {**kwargs, **filled} if filled else kwargs
        if self.input_dims:
            check_call(self.input_dims, input_labels(self.input_names, args, kwargs))
        return kwargs

    def call(self, module: nn.Module, args: tuple, kwargs: dict):
        """``module(*args, **kwargs)`` for a graph of this trace, shape errors typed."""
        kwargs = self.check_call(args, kwargs)
        if self.frontend == "export":
            self._check_structure(module, args, kwargs)
        try:
            return module(*args, **kwargs)
        except AssertionError as exc:
            if str(exc).strip().startswith("Guard failed"):
                raise guard_error(exc) from exc
            raise

    def _check_structure(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """An exported graph takes the inputs the example gave and no others (an optional
        input left out or None is baked in): a call that gives others is a ``ShapeError`` —
        which the extended model answers by tracing again — not a bare ``TypeError``."""
        known = self._signatures.get(module)
        if known is None:
            try:
                signature = inspect.signature(module.forward)
                example = signature.bind(*self.example_inputs, **self.example_kwargs).arguments
            except (TypeError, ValueError):   # not a signature this check can read: skip it
                signature, example = None, {}
            known = self._signatures[module] = (signature, {k: _kind(v)
                                                            for k, v in example.items()})
        signature, kinds = known
        if signature is None:
            return
        try:
            given = signature.bind(*args, **kwargs).arguments
            problem = next((f"{name!r} is {_kind(value)}, the example's is {kinds[name]}"
                            for name, value in given.items()
                            if name in kinds and _kind(value) != kinds[name]), None)
        except TypeError as exc:
            problem = str(exc)
        if problem is not None:
            raise ShapeError(
                f"inputs {describe_inputs(args, kwargs)} differ in structure from the example "
                f"inputs {describe_inputs(self.example_inputs, self.example_kwargs)} that "
                f"torch.export traced ({problem}): an exported graph takes exactly the inputs "
                "the example gave, and computes as if an input that was None is still None. "
                "To allow it: extend with example inputs that give the same inputs as your "
                "calls (None where you pass None)")


def _kind(value) -> str:
    """What torch.export bakes in about an input: None, a tensor, or another value (whose
    value the graph guards on)."""
    return "None" if value is None else "a tensor" if isinstance(value, torch.Tensor) \
        else "a value"


def _weight_hooks() -> tuple[type, ...]:
    from torch.nn.utils.spectral_norm import SpectralNorm
    from torch.nn.utils.weight_norm import WeightNorm
    return WeightNorm, SpectralNorm


def _has_forward_hooks(module: nn.Module) -> bool:
    """Forward hooks or pre-hooks other than the old ``weight_norm`` / ``spectral_norm`` ones,
    which only recompute ``module.weight`` (and run their power iteration under no_grad, which
    a graph would lose)."""
    return bool(module._forward_hooks) or any(
        not isinstance(h, _weight_hooks()) for h in module._forward_pre_hooks.values())


def _hooked(model: nn.Module) -> list[str]:
    """Qualified names of the modules with forward (pre-)hooks ("" is the model itself)."""
    return [name for name, m in model.named_modules() if _has_forward_hooks(m)]


_AUTOCAST_DEVICES = ("cpu", "cuda")


def _modes() -> tuple[bool, ...]:
    """Grad mode and autocast per device: what ``torch.no_grad()`` / ``torch.autocast`` in a
    forward switch, and what a symbolically traced graph does not record."""
    return (torch.is_inference_mode_enabled(), torch.is_grad_enabled(),
            *(torch.is_autocast_enabled(d) for d in _AUTOCAST_DEVICES))


class _Unrecordable(TraceError):
    """A forward no frontend can record faithfully: do not try the next one."""


class _SiteAwareTracer(fx.Tracer):
    """Trace *through* torch.nn modules that have children (e.g. ``MultiheadAttention``,
    ``TransformerEncoderLayer``): as opaque leaves they would hide linear sites inside them.
    A module with forward (pre-)hooks is traced through too, so its hooks are in the graph: as
    a leaf, a branch added after it would bypass a hook that rescales its output or input.

    Nodes recorded while the forward had switched grad mode or autocast (``with
    torch.no_grad():``) are listed in ``switched``: the graph would run them in the caller's
    mode, training what the forward froze or computing in another dtype."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.switched: list[str] = []
        self.inference: list[str] = []      # nodes made under torch.inference_mode()
        self._modes = _modes()

    def trace(self, root, concrete_args=None):
        with torch.enable_grad():
            self._modes = _modes()
            return super().trace(root, concrete_args)

    def create_node(self, kind, target, args, kwargs, name=None, type_expr=None):
        node = super().create_node(kind, target, args, kwargs, name, type_expr)
        if _modes() != self._modes:
            self.switched.append(node.name)
        if torch.is_inference_mode_enabled() and not self._modes[0]:
            self.inference.append(node.name)
        return node

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return super().is_leaf_module(m, module_qualified_name) and not any(m.children()) \
            and not _has_forward_hooks(m)


def _positional(model: nn.Module, args: tuple, kwargs: dict) -> tuple | None:
    """``args`` + ``kwargs`` as positional inputs in the forward's order (for ShapeProp), or
    None when the signature does not allow it (``*args`` / ``**kwargs``)."""
    if not kwargs:
        return args
    try:
        sig = inspect.signature(model.forward)
        bound = sig.bind(*args, **kwargs)
    except (TypeError, ValueError):
        return None
    if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in sig.parameters.values()):
        return None
    bound.apply_defaults()
    return tuple(bound.arguments.values())


def _symbolic_trace(model: nn.Module, args: tuple, kwargs: dict) -> tuple[fx.GraphModule,
                                                                          list[str]]:
    inputs = _positional(model, args, kwargs)
    if inputs is None:
        raise TraceError("keyword inputs that do not bind to named forward parameters")
    if _has_forward_hooks(model):   # symbolic_trace reads model.forward: it would drop them
        raise TraceError("forward hooks on the model itself, which symbolic_trace drops")
    tracer = _SiteAwareTracer()
    with attributes_kept(model):
        graph = tracer.trace(model)
        if tracer.inference:
            raise _Unrecordable(
                f"the forward of {type(model).__name__} runs "
                f"{', '.join(tracer.inference[:5])} under torch.inference_mode(), which neither "
                "torch.fx nor torch.export records (the graph would train what it freezes); "
                "use torch.no_grad() there instead, which torch.export keeps")
        if tracer.switched:
            raise TraceError(
                f"the forward switches grad mode or autocast (torch.no_grad, torch.autocast, "
                f"set_grad_enabled) around {', '.join(tracer.switched[:5])}, which "
                "symbolic_trace does not record")
        notes = follow_mode(graph, model, lambda: _SiteAwareTracer().trace(model))
        gm = fx.GraphModule(tracer.root, graph, model.__class__.__name__)
    with no_side_effects(gm), torch.no_grad():
        ShapeProp(gm).propagate(*inputs)  # also proves the graph runs on these inputs
    return gm, notes


def _through_var_keyword(model: nn.Module, args: tuple, kwargs: dict) -> list[str]:
    """The keyword inputs that reach the forward through ``**kwargs``."""
    try:
        bound = inspect.signature(model.forward).bind(*args, **kwargs)
    except (TypeError, ValueError):
        return []
    return [k for name, value in bound.arguments.items()
            if bound.signature.parameters[name].kind is inspect.Parameter.VAR_KEYWORD
            for k in value]


def _export(model: nn.Module, args: tuple, kwargs: dict, dynamic_shapes) -> TracedModel:
    spec = auto_dynamic_shapes(model, args, kwargs) if dynamic_shapes is None else dynamic_shapes
    # torch.export (2.13) takes no dynamic_shapes for inputs given through **kwargs (an
    # internal assertion): trace static shapes, and let the extended model trace other shapes.
    var_keyword = _through_var_keyword(model, args, kwargs) if dynamic_shapes is None else []
    if var_keyword:
        spec = None
    # A view (a slice of a longer batch) makes export guard on how it relates to its base, and
    # the graph then refuses the contiguous batches that follow: trace contiguous copies.
    args, kwargs = torch.utils._pytree.tree_map_only(
        torch.Tensor, lambda t: t.contiguous(), (args, kwargs))
    with no_side_effects(model), capture_shape_log() as messages:
        program = torch.export.export(model, args, kwargs=kwargs, dynamic_shapes=spec)
    gm = program.module()
    _bind_user_tensors(gm, model)
    names = forward_names(model)
    labels = input_labels(names, args, kwargs)
    ranges, fixed = exported_dims(gm, program, labels, specialisation_reasons(messages),
                                  user_spec=dynamic_shapes is not None)
    batch = [r for r in ranges if r.dim == 0]
    dynamic_batch = bool(batch) and not any(r.fixed for r in batch)
    notes = [f"torch.export fixed {f}" for f in fixed]
    if var_keyword:
        notes.append(f"{', '.join(var_keyword)} reach the forward through **kwargs, for which "
                     "torch.export takes no dynamic shapes: every shape is the example's, and "
                     "a call at another shape traces again (max_retraces)")
    if batch and not dynamic_batch:
        notes.append("the batch dimension is fixed: the extended model only accepts the "
                     "example batch size; make the model's shapes independent of the batch size "
                     "(or pass dynamic_shapes=...) to lift this.")
    return TracedModel(gm, "export", "", args, model.training, dynamic_batch, notes,
                       dict(kwargs), dynamic_shapes, fixed, ranges, names)


def _bind_user_tensors(gm: fx.GraphModule, model: nn.Module) -> None:
    """Make the exported module hold the user's own Parameter/buffer objects (same ids)."""
    for name, tensor in [*model.named_parameters(remove_duplicate=False),
                         *model.named_buffers(remove_duplicate=False)]:
        owner_path, _, attr = name.rpartition(".")
        try:
            owner = gm.get_submodule(owner_path) if owner_path else gm
        except AttributeError:
            continue
        current = getattr(owner, attr, None)
        if isinstance(current, torch.Tensor) and current is not tensor:
            if isinstance(tensor, nn.Parameter):
                owner._parameters[attr] = tensor
            elif attr in owner._buffers:
                owner._buffers[attr] = tensor


def _unflattenable(output) -> list[str]:
    """Type names of output leaves torch.export cannot return (e.g. ``DynamicCache``)."""
    leaves = torch.utils._pytree.tree_leaves(output)
    return sorted({type(x).__name__ for x in leaves
                   if not isinstance(x, torch.Tensor | int | float | bool | str | type(None))})


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
    dynamic_shapes spec, the mode and the identity of every parameter and buffer."""
    leaves, spec = torch.utils._pytree.tree_flatten((args, kwargs))
    described = tuple((tuple(x.shape), x.dtype, x.device) if isinstance(x, torch.Tensor)
                      else repr(x) for x in leaves)
    tensors = tuple(id(t) for t in [*model.parameters(), *model.buffers()])
    hooks = tuple((id(m), *m._forward_hooks, *m._forward_pre_hooks) for m in model.modules()
                  if _has_forward_hooks(m))
    return (str(spec), described, repr(dynamic_shapes), frontend, model.training, tensors,
            hooks)


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
        raise TraceError(f"morphc needs an nn.Module, got {type(model).__name__}")
    if frontend not in FRONTENDS:
        raise TraceError(f"unknown frontend {frontend!r}; choose one of {FRONTENDS}")
    given = args if args is not None else example_inputs
    if isinstance(given, ExampleInputs):
        kwargs = {**given.kwargs, **(kwargs or {})}
        dynamic_shapes = dynamic_shapes if dynamic_shapes is not None else given.dynamic_shapes
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


def _trace(model, inputs, kwargs, dynamic_shapes, frontend) -> TracedModel:
    traced_kwargs = _run_once(model, inputs, kwargs)
    notes = [] if traced_kwargs is kwargs else [
        "use_cache=True returns a cache object torch.export cannot flatten: traced with "
        "use_cache=False (the extended model returns no cache)"]
    symbolic_error = None
    if frontend in ("auto", "symbolic_trace") and dynamic_shapes is None:
        try:
            gm, mode_notes = _symbolic_trace(model, inputs, traced_kwargs)
            return TracedModel(gm, "symbolic_trace", "torch.fx.symbolic_trace succeeded",
                               inputs, model.training, dynamic_batch=True,
                               notes=notes + _hook_notes(model) + mode_notes,
                               example_kwargs=dict(traced_kwargs))
        except _Unrecordable:
            raise
        except Exception as exc:  # any tracing failure means: try the next frontend
            symbolic_error = exc
            if frontend == "symbolic_trace":
                raise TraceError(
                    f"torch.fx.symbolic_trace failed ({first_line(exc)}); "
                    "use frontend='auto' or 'export'"
                ) from exc
    try:
        traced = _export(model, inputs, traced_kwargs, dynamic_shapes)
    except Exception as exc:
        tried = f"symbolic_trace: {first_line(symbolic_error)}; " if symbolic_error else ""
        raise TraceError(
            f"could not trace {type(model).__name__}: {tried}torch.export: {first_line(exc)}. "
            "The model runs on the example inputs, so this is its tracing: data-dependent "
            "Python control flow (if/for on tensor values) defeats both frontends — rewrite it "
            "with torch.where / torch.cond; a dynamic_shapes spec torch.export rejects is "
            "reported here too."
        ) from exc
    traced.reason = (f"symbolic_trace failed ({first_line(symbolic_error)})"
                     if symbolic_error else
                     "requested" if frontend == "export" else "dynamic_shapes given")
    traced.notes = notes + traced.notes + _hook_notes(model)
    return traced


def _hook_notes(model: nn.Module) -> list[str]:
    hooked = _hooked(model)
    if not hooked:
        return []
    return [f"forward hooks on {', '.join(n or '(the model)' for n in hooked)} were traced into "
            "the graph: what they compute is kept, but they ran once at trace time, so their "
            "side effects (logging, storing activations) do not happen on the extended model"]


__all__ = ["FRONTENDS", "ExampleInputs", "ShapeError", "TracedModel", "trace"]
