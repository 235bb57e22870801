"""The two frontends, each turning a module and its example inputs into a graph of it.

``torch.fx.symbolic_trace`` (cheap, keeps ``call_module`` nodes that name the user's submodules,
traces through modules with children or forward hooks, refuses a forward whose grad mode or
autocast switches it cannot record) and ``torch.export`` (every parameter named by its qualified
name, dynamic shapes, the user's own Parameter and buffer objects bound back into the graph).
Kept apart from :mod:`morphc.ir.trace`, which chooses between them, runs the model once first
and caches the result: here is only how each frontend is driven and what it cannot record.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import re
import sys
from collections.abc import Iterator

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp, _extract_tensor_metadata

from morphc.errors import TraceError
from morphc.ir.mode_flags import follow_mode
from morphc.ir.shapes import (
    auto_dynamic_shapes,
    capture_shape_log,
    exported_dims,
    forward_names,
    input_labels,
    specialisation_reasons,
)
from morphc.ir.traced_model import TracedModel
from morphc.ir.untouched import attributes_kept, no_side_effects


def _weight_hooks() -> tuple[type, ...]:
    from torch.nn.utils.spectral_norm import SpectralNorm
    from torch.nn.utils.weight_norm import WeightNorm
    return WeightNorm, SpectralNorm


def has_forward_hooks(module: nn.Module) -> bool:
    """Forward hooks or pre-hooks other than the old ``weight_norm`` / ``spectral_norm`` ones,
    which only recompute ``module.weight`` (and run their power iteration under no_grad, which
    a graph would lose)."""
    return bool(module._forward_hooks) or any(
        not isinstance(h, _weight_hooks()) for h in module._forward_pre_hooks.values())


def _hooked(model: nn.Module) -> list[str]:
    """Qualified names of the modules with forward (pre-)hooks ("" is the model itself)."""
    return [name for name, m in model.named_modules() if has_forward_hooks(m)]


def hook_notes(model: nn.Module) -> list[str]:
    hooked = _hooked(model)
    if not hooked:
        return []
    return [f"forward hooks on {', '.join(n or '(the model)' for n in hooked)} were traced into "
            "the graph: what they compute is kept, but they ran once at trace time, so their "
            "side effects (logging, storing activations) do not happen on the extended model"]


# modules whose eager forward, in eval() under torch.no_grad(), takes PyTorch's fused fast path
_FAST_PATH = (nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.TransformerEncoder)


def fast_path_notes(model: nn.Module) -> list[str]:
    """Both frontends trace with grad enabled, where these modules run their standard path; in
    eval() under torch.no_grad() the eager model runs fused kernels instead (rounding apart) and,
    given a padding mask, nested tensors that return 0 at padded positions. No graph records
    that path, so the extended model cannot match it there: say so, and what makes them agree."""
    names: list[str] = []
    for name, m in model.named_modules():
        if isinstance(m, _FAST_PATH) and not m.training and \
                not any(name.startswith(f"{outer}.") or not outer for outer in names):
            names.append(name)
    names = [name or type(model).__name__ for name in names]
    if not names or not torch.backends.mha.get_fastpath_enabled():
        return []
    return [f"{', '.join(names[:4])}{' …' if len(names) > 4 else ''} in eval() mode: under "
            "torch.no_grad() PyTorch runs their fused inference fast path (with a padding mask, "
            "nested tensors that give 0 at padded positions), which no graph records; the "
            "extended model computes their standard path, what the model computes with grad "
            "enabled, so under no_grad the two differ by rounding, and at padded positions "
            "entirely. torch.backends.mha.set_fastpath_enabled(False) makes the model take "
            "the standard path too (bit for bit)"]


_AUTOCAST_DEVICES = ("cpu", "cuda")


def _modes() -> tuple[bool, ...]:
    """Grad mode and autocast per device: what ``torch.no_grad()`` / ``torch.autocast`` in a
    forward switch, and what a symbolically traced graph does not record."""
    return (torch.is_inference_mode_enabled(), torch.is_grad_enabled(),
            *(torch.is_autocast_enabled(d) for d in _AUTOCAST_DEVICES))


def is_scripted(module: nn.Module) -> bool:
    """A ``torch.jit.script``-ed module: its forward is TorchScript, which neither frontend can
    trace into (torch.export stops on it too), so a graph calls it whole. A ``torch.jit.trace``-d
    one is left to torch.export, which does trace into it (and finds its sites)."""
    return isinstance(module, torch.jit.ScriptModule) and \
        not isinstance(module, torch.jit.TracedModule)


class Unrecordable(TraceError):
    """A forward no frontend can record faithfully: do not try the next one."""


# a reentrant checkpoint's function runs in CheckpointFunction.forward, under torch.no_grad()
_REENTRANT = re.compile(r'utils[/\\]checkpoint\.py", line \d+, in forward\b')


def reentrant_checkpoint(model: nn.Module, where: list[str]) -> Unrecordable:
    """torch.utils.checkpoint(..., use_reentrant=True): the function runs under no_grad and is
    recomputed in backward, which neither frontend records (torch.export's graph freezes it and
    the layers after it). The non-reentrant checkpoint traces, so name it."""
    return Unrecordable(
        f"{type(model).__name__} runs {', '.join(where[:5])} inside "
        "torch.utils.checkpoint.checkpoint(..., use_reentrant=True), which runs them under "
        "torch.no_grad() and recomputes them in backward: neither torch.fx nor torch.export "
        "records that (the graph would freeze those layers). Pass use_reentrant=False (what "
        "PyTorch recommends), which morphc traces; the extended graph then runs those layers "
        "without recomputation, so a cycle needs their activations' memory")


def _module_path(node: fx.Node) -> str:
    """The innermost module an exported node was computed in (its name if none)."""
    stack = node.meta.get("nn_module_stack") or {}
    return next((path for path, _ in reversed(stack.values()) if path), node.name)


def _in_reentrant_checkpoint() -> bool:
    code = torch.utils.checkpoint.CheckpointFunction.forward.__code__
    frame = sys._getframe(1)
    while frame is not None and frame.f_code is not code:
        frame = frame.f_back
    return frame is not None


# Sequence packing reads its lengths as values (``torch.as_tensor(lengths)``, sorting them), which
# a Proxy cannot give: recorded as calls, the packed sequence flows into the RNN (a leaf) whole.
_PACKING = (nn.utils.rnn.pack_padded_sequence, nn.utils.rnn.pad_packed_sequence,
            nn.utils.rnn.pack_sequence, nn.utils.rnn.unpack_sequence,
            nn.utils.rnn.pad_sequence, nn.utils.rnn.unpad_sequence)


def _is_packed(x) -> bool:
    return isinstance(x, nn.utils.rnn.PackedSequence)


class _ShapeProp(ShapeProp):
    """ShapeProp through packed sequences: it rebuilds each namedtuple output with
    TensorMetadata in place of its tensors, which PackedSequence's constructor rejects. A node
    that takes or makes one records its tensors' metadata with the packed sequence as a tuple."""

    def run_node(self, n: fx.Node):
        operands = self.fetch_args_kwargs_from_env(n)
        if not (n.op == "call_function" and n.target in _PACKING or
                any(map(_is_packed, torch.utils._pytree.tree_leaves(operands,
                                                                    is_leaf=_is_packed)))):
            return super().run_node(n)
        result = fx.Interpreter.run_node(self, n)
        plain = torch.utils._pytree.tree_map_only(nn.utils.rnn.PackedSequence, tuple, result,
                                                  is_leaf=_is_packed)
        n.meta["tensor_meta"] = torch.utils._pytree.tree_map_only(
            torch.Tensor, _extract_tensor_metadata, plain)
        n.meta["type"] = type(result)
        return result


class _SiteAwareTracer(fx.Tracer):
    """Trace *through* torch.nn modules that have children (e.g. ``MultiheadAttention``,
    ``TransformerEncoderLayer``): as opaque leaves they would hide linear sites inside them.
    A module with forward (pre-)hooks is traced through too, so its hooks are in the graph: as
    a leaf, a branch added after it would bypass a hook that rescales its output or input.
    A ``torch.jit.script``-ed module is a leaf: its TorchScript forward cannot take a Proxy.

    Nodes recorded while the forward had switched grad mode or autocast (``with
    torch.no_grad():``) are listed in ``switched``: the graph would run them in the caller's
    mode, training what the forward froze or computing in another dtype."""

    def __init__(self) -> None:
        super().__init__(autowrap_functions=_PACKING)
        self._autowrap_search.append(nn.utils.rnn)     # nn.utils.rnn.pack_padded_sequence(...)
        self.switched: list[str] = []
        self.inference: list[str] = []      # nodes made under torch.inference_mode()
        self.reentrant: list[str] = []      # ... inside a reentrant activation checkpoint
        self._modes = _modes()

    def trace(self, root, concrete_args=None):
        with torch.enable_grad():
            self._modes = _modes()
            graph = super().trace(root, concrete_args)
        # a wrapped call's code registers fx.wrap("torch.nn.utils.rnn.pack_padded_sequence"),
        # a qualified name every later fx trace (torch.export's too) then fails to patch
        for node in graph.nodes:
            if node.op == "call_function" and node.target in _PACKING:
                node.meta.pop("is_wrapped", None)
        return graph

    def create_node(self, kind, target, args, kwargs, name=None, type_expr=None):
        node = super().create_node(kind, target, args, kwargs, name, type_expr)
        if _modes() != self._modes:
            self.switched.append(node.name)
            if _in_reentrant_checkpoint():
                self.reentrant.append(node.name)
        if torch.is_inference_mode_enabled() and not self._modes[0]:
            self.inference.append(node.name)
        return node

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, torch.jit.TracedModule):     # symbolic_trace would call it opaquely
            raise TraceError(f"{module_qualified_name} is torch.jit.trace-d: torch.export "
                             "traces into it")
        if is_scripted(m):
            return True
        return super().is_leaf_module(m, module_qualified_name) and not any(m.children()) \
            and not has_forward_hooks(m)


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


def trace_symbolic(model: nn.Module, args: tuple, kwargs: dict) -> tuple[fx.GraphModule,
                                                                         list[str]]:
    inputs = _positional(model, args, kwargs)
    if inputs is None:
        raise TraceError("keyword inputs symbolic_trace cannot pass: the forward takes "
                         "*args / **kwargs, or does not name them")
    if has_forward_hooks(model):   # symbolic_trace reads model.forward: it would drop them
        raise TraceError("forward hooks on the model itself, which symbolic_trace drops")
    tracer = _SiteAwareTracer()
    with attributes_kept(model):
        graph = tracer.trace(model)
        if tracer.inference:
            raise Unrecordable(
                f"the forward of {type(model).__name__} runs "
                f"{', '.join(tracer.inference[:5])} under torch.inference_mode(), which neither "
                "torch.fx nor torch.export records (the graph would train what it freezes); "
                "use torch.no_grad() there instead, which torch.export keeps")
        if tracer.reentrant:
            raise reentrant_checkpoint(model, tracer.reentrant)
        if tracer.switched:
            raise TraceError(
                f"the forward switches grad mode or autocast (torch.no_grad, torch.autocast, "
                f"set_grad_enabled) around {', '.join(tracer.switched[:5])}, which "
                "symbolic_trace does not record")
        notes = follow_mode(graph, model, lambda: _SiteAwareTracer().trace(model))
        gm = fx.GraphModule(tracer.root, graph, model.__class__.__name__)
    # also proves the graph runs on these inputs; ShapeProp prints the traceback of a node that
    # fails before raising, which here only means "try torch.export" and is not the user's error
    with no_side_effects(gm), torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):
        _ShapeProp(gm).propagate(*inputs)
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


def _below_error(record: logging.LogRecord) -> bool:
    return record.levelno < logging.ERROR


@contextlib.contextmanager
def quiet_export() -> Iterator[None]:
    """Keep a failing ``torch.export`` from writing to stderr: it prints the partial graph
    (``print(e.partial_fx_graph, file=sys.stderr)``) and logs an error for the errors it
    classifies, before morphc raises its TraceError, which says what failed and what to do
    (the partial graph stays on its ``__cause__``). Only for the call, only ``sys.stderr`` and
    that one logger's errors: what an export that succeeds writes is written after it, and the
    user's logging config is left as it was."""
    logger, written = logging.getLogger("torch.export._trace"), io.StringIO()
    logger.addFilter(_below_error)
    try:
        with contextlib.redirect_stderr(written):
            yield
    finally:
        logger.removeFilter(_below_error)
    sys.stderr.write(written.getvalue())      # not reached on failure


def cumulative_batchnorms(model: nn.Module) -> list[str]:
    """BatchNorm layers that, training with ``momentum=None`` (a cumulative moving average),
    turn ``num_batches_tracked`` into a Python float (``1 / n``): a buffer's value torch.export
    cannot trace (it reports a data-dependent guard, as for control flow on a tensor)."""
    return [name or type(model).__name__ for name, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training
            and m.track_running_stats and m.momentum is None]


def trace_export(model: nn.Module, args: tuple, kwargs: dict, dynamic_shapes) -> TracedModel:
    cumulative = cumulative_batchnorms(model)
    if cumulative:
        raise Unrecordable(
            f"BatchNorm {', '.join(cumulative[:5])} has momentum=None (a cumulative moving "
            "average), which in training mode computes 1 / num_batches_tracked as a Python "
            "float: torch.export cannot trace a buffer's value into a number. Give it a "
            "numeric momentum (PyTorch's default is 0.1), or trace in eval() mode; "
            "torch.fx.symbolic_trace, tried first without dynamic_shapes, keeps BatchNorm as a "
            "layer and traces it")
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
    with no_side_effects(model), capture_shape_log() as messages, quiet_export():
        program = torch.export.export(model, args, kwargs=kwargs, dynamic_shapes=spec)
    reentrant = [_module_path(n) for sub in program.graph_module.modules()
                 if isinstance(sub, fx.GraphModule) for n in sub.graph.nodes
                 if _REENTRANT.search(n.meta.get("stack_trace") or "")]
    if reentrant:
        raise reentrant_checkpoint(model, list(dict.fromkeys(reentrant)))
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
    traced = TracedModel(gm, "export", "", args, model.training, dynamic_batch, notes,
                         dict(kwargs), dynamic_shapes, fixed, ranges, names)
    traced.number_defaults = number_defaults(model)
    return traced


def number_defaults(model: nn.Module) -> dict:
    """The forward's parameters whose default is a Python number: an example that leaves one
    out is traced with its default baked in, which a later call that gives it must be told."""
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return {}
    return {p.name: p.default for p in params
            if isinstance(p.default, bool | int | float) and p.default is not p.empty}


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
