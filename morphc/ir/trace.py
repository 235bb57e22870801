"""Frontends: turn a user's ``nn.Module`` into a ``torch.fx.GraphModule``.

``torch.fx.symbolic_trace`` is tried first (cheap, keeps ``call_module`` nodes that name the user's
submodules); when it fails, typically on data-dependent control flow, ``torch.export`` is used
(its graph names every parameter by its qualified name). Whichever ran, the resulting graph module
holds the user's *own* Parameter and buffer objects, so training it trains the user's model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from morphc.errors import TraceError

FRONTENDS = ("auto", "symbolic_trace", "export")


@dataclass
class TracedModel:
    """A graph of the user's model plus how it was obtained."""

    graph_module: fx.GraphModule
    frontend: str
    reason: str
    example_inputs: tuple
    training: bool
    dynamic_batch: bool | None = None
    notes: list[str] = field(default_factory=list)


class _SiteAwareTracer(fx.Tracer):
    """Trace *through* torch.nn modules that have children (e.g. ``MultiheadAttention``,
    ``TransformerEncoderLayer``): as opaque leaves they would hide linear sites inside them."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return super().is_leaf_module(m, module_qualified_name) and not any(m.children())


@contextlib.contextmanager
def no_side_effects(module: nn.Module) -> Iterator[None]:
    """Run probe forwards without leaving a trace: buffers (BatchNorm statistics) and the RNG
    state are restored afterwards."""
    saved = {name: buf.detach().clone() for name, buf in module.named_buffers()}
    with torch.random.fork_rng(devices=[]):
        try:
            yield
        finally:
            with torch.no_grad():
                for name, buf in module.named_buffers():
                    if name in saved:
                        buf.copy_(saved[name])


def _as_tuple(example_inputs) -> tuple:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, list | tuple):
        return tuple(example_inputs)
    raise TraceError(
        f"example_inputs must be a tensor or a tuple of positional inputs, got "
        f"{type(example_inputs).__name__}; pass e.g. (torch.randn(8, 3, 32, 32),)"
    )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


def _symbolic_trace(model: nn.Module, inputs: tuple) -> fx.GraphModule:
    tracer = _SiteAwareTracer()
    graph = tracer.trace(model)
    gm = fx.GraphModule(tracer.root, graph, model.__class__.__name__)
    with no_side_effects(gm), torch.no_grad():
        ShapeProp(gm).propagate(*inputs)  # also proves the graph runs on these inputs
    return gm


def _export(model: nn.Module, inputs: tuple) -> tuple[fx.GraphModule, bool, list[str]]:
    notes: list[str] = []
    dynamic = tuple(
        {0: torch.export.Dim.AUTO} if isinstance(x, torch.Tensor) and x.dim() > 0 else None
        for x in inputs
    )
    with no_side_effects(model):
        program = torch.export.export(model, inputs, dynamic_shapes=dynamic)
    gm = program.module()
    _bind_user_tensors(gm, model)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    batch_dims = [
        n.meta["val"].shape[0]
        for n in placeholders
        if isinstance(n.meta.get("val"), torch.Tensor) and n.meta["val"].dim() > 0
    ]
    dynamic_batch = bool(batch_dims) and all(isinstance(d, torch.SymInt) for d in batch_dims)
    if not dynamic_batch:
        notes.append(
            "torch.export specialised the batch dimension: the extended model only accepts "
            f"batch size {[int(d) for d in batch_dims]}; make the model's shapes independent "
            "of the batch size to lift this."
        )
    return gm, dynamic_batch, notes


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


def trace(model: nn.Module, example_inputs, frontend: str = "auto") -> TracedModel:
    """Trace ``model`` into a graph; report which frontend was used and why.

    >>> traced = trace(nn.Sequential(nn.Linear(4, 3), nn.ReLU()), (torch.randn(2, 4),))
    >>> traced.frontend
    'symbolic_trace'
    """
    if not isinstance(model, nn.Module):
        raise TraceError(f"morphc needs an nn.Module, got {type(model).__name__}")
    if frontend not in FRONTENDS:
        raise TraceError(f"unknown frontend {frontend!r}; choose one of {FRONTENDS}")
    inputs = _as_tuple(example_inputs)
    symbolic_error = None
    if frontend in ("auto", "symbolic_trace"):
        try:
            gm = _symbolic_trace(model, inputs)
            return TracedModel(gm, "symbolic_trace", "torch.fx.symbolic_trace succeeded",
                               inputs, model.training, dynamic_batch=True)
        except Exception as exc:  # any tracing failure means: try the next frontend
            symbolic_error = exc
            if frontend == "symbolic_trace":
                raise TraceError(
                    f"torch.fx.symbolic_trace failed ({_first_line(exc)}); "
                    "use frontend='auto' or 'export'"
                ) from exc
    try:
        gm, dynamic_batch, notes = _export(model, inputs)
    except Exception as exc:
        tried = f"symbolic_trace: {_first_line(symbolic_error)}; " if symbolic_error else ""
        raise TraceError(
            f"could not trace {type(model).__name__}: {tried}torch.export: {_first_line(exc)}. "
            "Data-dependent Python control flow (if/for on tensor values) defeats both "
            "frontends: rewrite it with torch.where / torch.cond, or check that the model runs "
            "on example_inputs."
        ) from exc
    reason = (
        f"symbolic_trace failed ({_first_line(symbolic_error)})"
        if symbolic_error else "requested"
    )
    return TracedModel(gm, "export", reason, inputs, model.training, dynamic_batch, notes)
