"""Typed errors. Each says what went wrong *and* what to do about it."""


class MorphcError(Exception):
    """Base class of every error morphc raises on purpose."""


class TraceError(MorphcError):
    """Neither frontend (symbolic_trace, torch.export) could turn the model into a graph."""


class ShapeError(MorphcError):
    """An input has a shape the traced graph cannot take (torch.export fixed or bounded that
    dimension); the message names the input, the dimension, what is allowed and how to allow
    more (``dynamic_shapes=...`` at extend time). Also a Python number input (``temperature=t``)
    whose value differs from the one torch.export baked in: an input the graph cannot take,
    though not a shape; the message names the argument, both values and to pass a tensor."""


class SiteError(MorphcError):
    """A requested extension site does not exist or cannot be extended."""


class FamilyError(MorphcError):
    """An activation family is malformed or its constraint set C cannot be derived."""


class ContractionError(MorphcError):
    """Contraction would not be exact (constraints unmet) or would produce bad weights."""


class PassError(MorphcError):
    """A graph pass failed; the message names the pass and those that ran before it."""


class BypassError(MorphcError):
    """The Bypass runtime hit a state it cannot recover from (e.g. NaN with on_nan='raise')."""


class MoveError(MorphcError):
    """A model-space move cannot be applied here, or would change the function (so it was
    refused)."""


class FormatError(MorphcError):
    """A graph cannot be written as data, or a saved file is not a valid, allowed graph."""
