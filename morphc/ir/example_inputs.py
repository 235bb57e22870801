"""Example inputs: the positional and keyword inputs a model is traced and checked with, and
what running the model on them says when it fails.

Kept apart from the frontends (:mod:`morphc.ir.frontends`) because everything that takes inputs
from a user — Bypass, the model-space moves, the CLI — needs them without tracing anything.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from morphc.errors import TraceError
from morphc.ir.untouched import no_side_effects


class ExampleInputs(tuple):
    """Positional example inputs that carry the keyword ones (``kwargs``) and torch.export's
    ``dynamic_shapes`` along, so code that hands example inputs on — model-space moves, each of
    which may trace again — keeps the three together. It is a tuple of the positional inputs,
    so code that needs only those works unchanged.

    >>> inputs = ExampleInputs.of((torch.randn(2, 4),), kwargs={"mask": None})
    >>> len(inputs), inputs.kwargs
    (1, {'mask': None})
    """

    kwargs: dict
    dynamic_shapes: object

    def __new__(cls, args=(), kwargs=None, dynamic_shapes=None):
        self = super().__new__(cls, args)
        self.kwargs, self.dynamic_shapes = dict(kwargs or {}), dynamic_shapes
        return self

    @classmethod
    def of(cls, example_inputs, kwargs=None, dynamic_shapes=None) -> ExampleInputs:
        """``example_inputs`` (a tensor, a tuple or already an ``ExampleInputs``) with
        ``kwargs`` / ``dynamic_shapes`` added (those given here take precedence)."""
        if isinstance(example_inputs, ExampleInputs) and kwargs is None and \
                dynamic_shapes is None:
            return example_inputs
        return cls(as_tuple(example_inputs),
                   {**getattr(example_inputs, "kwargs", {}), **(kwargs or {})},
                   dynamic_shapes if dynamic_shapes is not None else
                   getattr(example_inputs, "dynamic_shapes", None))

    def call(self, module: nn.Module):
        """``module(*args, **kwargs)`` on these inputs."""
        return module(*self, **self.kwargs)


def as_tuple(example_inputs) -> tuple:
    """A tensor or a list/tuple of positional inputs as a tuple; anything else is refused."""
    if example_inputs is None:
        return ()
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, list | tuple):
        return tuple(example_inputs)
    raise TraceError(
        f"example_inputs must be a tensor or a tuple of positional inputs, got "
        f"{type(example_inputs).__name__}; pass e.g. (torch.randn(8, 3, 32, 32),), and keyword "
        "inputs as kwargs={...}"
    )


def first_line(exc: BaseException) -> str:
    """``TypeError: the first line of the message``, at most 300 characters."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


def describe_inputs(args: tuple, kwargs: dict | None = None) -> str:
    """``(8, 7) float32, mask=(8, 7) bool``: what a message says about example inputs."""
    def one(t):
        return f"{tuple(t.shape)} {str(t.dtype).removeprefix('torch.')}" \
            if isinstance(t, torch.Tensor) else type(t).__name__
    return ", ".join([*map(one, args), *(f"{k}={one(v)}" for k, v in (kwargs or {}).items())])


def run_example(model: nn.Module, args: tuple, kwargs: dict | None = None):
    """Run the model once on example inputs (no grad; buffers and RNG restored) and return its
    output. A failure is a :class:`TraceError` naming the inputs and the model's own error, so a
    wrong shape is reported as such — not as a tracing failure later (trace, Bypass, the CLI)."""
    try:
        with no_side_effects(model), torch.no_grad():
            return model(*args, **(kwargs or {}))
    except Exception as exc:
        if not args and not kwargs and _needs_inputs(model):
            raise TraceError(
                f"{type(model).__name__} takes inputs, and none were given: morphc runs the "
                "model once to trace it. Pass example inputs of the shape you train with, e.g. "
                "morphc.extend(model, (torch.randn(8, 784),)) or morphc.inspect(model, "
                "(x_batch,))") from exc
        raise TraceError(
            f"the model fails on the example inputs {describe_inputs(args, kwargs)}: "
            f"{first_line(exc)}. Check the inputs' shapes and dtypes (and pass keyword inputs "
            "as kwargs=...)") from exc


def _needs_inputs(model: nn.Module) -> bool:
    """Whether the forward has a parameter without a default (so calling it bare must fail)."""
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD,
                                                   p.KEYWORD_ONLY) for p in params)
