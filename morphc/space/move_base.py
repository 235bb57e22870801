"""What every move shares: the private working copy it rewrites, and the ``Move`` base class.

A move never touches the module it is given: ``Move.__call__`` deep-copies it as a graph (tracing a
plain ``nn.Module`` first), records its shapes, lets the concrete move rewrite that copy
(``apply_to``) and checks that the result runs on the example inputs. Apart from the concrete moves
(``morphc.space.moves``), which only say how they rewrite, because ``ModelSpace`` makes and measures
such copies too.
"""

from __future__ import annotations

import contextlib
import copy
import io
from dataclasses import asdict, dataclass, fields

import torch
from torch import fx, nn

from morphc.compiler.extended import ExtendedModel
from morphc.errors import MoveError
from morphc.ir.example_inputs import ExampleInputs
from morphc.ir.frontends import _ShapeProp
from morphc.ir.tags import FRONTEND
from morphc.ir.trace import trace
from morphc.ir.traced_model import TracedModel
from morphc.ir.untouched import no_side_effects


# -- working copies ---------------------------------------------------------------------------
def graph_of(module: nn.Module) -> fx.GraphModule:
    return module.graph_module if isinstance(module, ExtendedModel) else module


def _placeholder_values(gm: fx.GraphModule, inputs: ExampleInputs) -> tuple:
    """The graph's placeholder values for ``inputs``: keyword inputs bound by name, or flattened
    the way an exported graph's forward flattens ``(args, kwargs)``."""
    spec = getattr(gm, "_in_spec", None)
    if spec is not None:
        return tuple(torch.fx._pytree.tree_flatten_spec((tuple(inputs), inputs.kwargs), spec))
    if not inputs.kwargs:
        return tuple(inputs)
    names = [n.target for n in gm.graph.nodes if n.op == "placeholder"]
    values = dict(zip(names, inputs, strict=False))
    values.update(inputs.kwargs)
    defaults = {n.target: n.args[0] for n in gm.graph.nodes if n.op == "placeholder" and n.args}
    return tuple(values[n] if n in values else defaults.get(n) for n in names)


def annotate(module: nn.Module, inputs: tuple) -> None:
    """Record each node's shape (``node.meta['tensor_meta']``) without touching BN statistics.
    The tracer's ShapeProp: plain ShapeProp fails on a packed sequence (LSTM over
    ``pack_padded_sequence``), rebuilding it with metadata where its tensors were."""
    gm = graph_of(module)
    held = io.StringIO()      # ShapeProp prints a traceback before raising; the error says it
    with no_side_effects(gm), torch.no_grad(), contextlib.redirect_stderr(held):
        _ShapeProp(gm).propagate(*_placeholder_values(gm, ExampleInputs.of(inputs)))


def failure(exc: BaseException) -> str:
    """What went wrong, in a line: ShapeProp wraps the real error in one that names the node
    and ends with a pointer to tlparse."""
    cause = exc.__cause__ if exc.__cause__ is not None else exc
    lines = str(cause).strip().splitlines() or [""]
    return f"{type(cause).__name__}: {lines[0][:200]}"


def private_copy(module: nn.Module, inputs: tuple) -> nn.Module:
    """A deep copy as a graph (tracing a plain ``nn.Module`` first, with the keyword inputs and
    ``dynamic_shapes`` an :class:`ExampleInputs` carries), shapes annotated."""
    if isinstance(module, fx.GraphModule | ExtendedModel):
        work = copy.deepcopy(module)
    else:
        traced = trace(module, inputs)
        if isinstance(inputs, ExampleInputs):   # e.g. use_cache=False added by the frontend
            for key, value in traced.example_kwargs.items():
                inputs.kwargs.setdefault(key, value)
        work = copy.deepcopy(traced.graph_module)
        work.meta[FRONTEND] = traced.frontend
    try:
        annotate(work, inputs)
    except Exception as exc:   # e.g. a space's module converted with .double() afterwards
        raise MoveError(
            f"the architecture fails on the example inputs ({failure(exc)}); if you converted "
            "it (.double(), .to(device)) after making the space, convert the example inputs "
            "alike, or convert the model before ModelSpace(...)") from exc
    return work


def as_traced(gm: fx.GraphModule, inputs: tuple) -> TracedModel:
    """Hand an architecture that already is a graph to ``morphc.extend`` without re-tracing
    (re-tracing would inline grown branches and lose them as modules)."""
    frontend = getattr(gm, "meta", {}).get(FRONTEND, "symbolic_trace")
    inputs = ExampleInputs.of(inputs)
    return TracedModel(gm, frontend, "a ModelSpace architecture (already a graph)",
                       tuple(inputs), gm.training, dynamic_batch=True,
                       example_kwargs=dict(inputs.kwargs), dynamic_shapes=inputs.dynamic_shapes)


# -- the base class ---------------------------------------------------------------------------
@dataclass
class Move:
    """Base class: ``move(module, example_inputs) -> new module``; the input stays untouched."""

    @torch.inference_mode(False)   # a move's result is trained: no inference tensors in it
    def __call__(self, module: nn.Module, example_inputs, *, kwargs=None,
                 dynamic_shapes=None) -> nn.Module:
        """Inputs as for ``morphc.extend``: positional ``example_inputs``, keyword ``kwargs``,
        torch.export's ``dynamic_shapes`` (used when ``module`` must be traced first)."""
        self._check_seed()
        inputs = ExampleInputs.of(example_inputs, kwargs, dynamic_shapes)
        result = self.apply_to(private_copy(module, inputs), inputs)
        try:
            annotate(result, inputs)
        except Exception as exc:   # a move that built a graph its own inputs cannot run
            raise MoveError(
                f"{self} built an architecture that fails on the example inputs "
                f"({failure(exc)}); the model "
                "you passed is unchanged. This is a morphc bug: please report it with the "
                "model, and try another move meanwhile") from exc
        return result

    def _check_seed(self) -> None:
        """Every move that draws random numbers seeds a ``torch.Generator`` with ``seed``; a
        float or a string would fail deep inside torch with an untyped error."""
        seed = getattr(self, "seed", 0)
        if type(seed) is not int or not -2 ** 63 <= seed < 2 ** 64:
            raise MoveError(f"{type(self).__name__}: seed must be an int (a torch.Generator "
                            f"seed), got {seed!r}")

    def apply_to(self, module: nn.Module, inputs: tuple) -> nn.Module:
        """Rewrite ``module`` (a private copy, shapes annotated) into the new architecture."""
        raise NotImplementedError(f"{type(self).__name__} must implement apply_to(module, "
                                  "inputs) -> the rewritten module")

    def describe(self) -> dict:
        """JSON-able description (edge attribute in the space)."""
        spec = {"move": type(self).__name__}
        for key, value in asdict(self).items():
            spec[key] = value if isinstance(value, str | int | float | bool | None | list) \
                else repr(value)
        return spec

    def __str__(self) -> str:
        args = ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in fields(self)
                         if getattr(self, f.name) != f.default)
        return f"{type(self).__name__}({args})"

