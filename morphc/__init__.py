"""morphc: a model-morphism compiler for PyTorch.

Extend a model with bypass branches that change nothing, train in the larger space, and fold the
branches back into the model's own weights, exactly.

Every public name is listed in ``__all__`` and loads on first use (PEP 562), so ``import morphc``
and ``morphc --help`` do not import torch.
"""

import importlib

__version__ = "0.1.0"

# public name -> module that defines it
_PUBLIC = {
    "AnyOf": "morphc.runtime.triggers",
    "AllOf": "morphc.runtime.triggers",
    "Bypass": "morphc.runtime.bypass",
    "BypassError": "morphc.errors",
    "Contract": "morphc.space.moves",
    "ContractionError": "morphc.errors",
    "Deepen": "morphc.space.moves",
    "Extend": "morphc.space.moves",
    "ExtendedModel": "morphc.compiler.extended",
    "FamilyError": "morphc.errors",
    "FormatError": "morphc.errors",
    "GradientNorm": "morphc.runtime.triggers",
    "Grow": "morphc.space.moves",
    "HillClimb": "morphc.space.search",
    "InspectionReport": "morphc.tools.inspect",
    "ModelSpace": "morphc.space.graph",
    "MorphcError": "morphc.errors",
    "MoveError": "morphc.errors",
    "PassError": "morphc.errors",
    "Plateau": "morphc.runtime.triggers",
    "Schedule": "morphc.runtime.triggers",
    "ShapeError": "morphc.errors",
    "SiteError": "morphc.errors",
    "TraceError": "morphc.errors",
    "Trigger": "morphc.runtime.triggers",
    "Ungrow": "morphc.space.moves",
    "Widen": "morphc.space.moves",
    "available_families": "morphc.families",
    "contract": "morphc.compiler.contract",
    "extend": "morphc.compiler.extend",
    "inspect": "morphc.tools.inspect",
    "load": "morphc.space.loading",
    "register_activation": "morphc.families",
    "save": "morphc.space.saving",
    "trace": "morphc.ir.trace",
}
# modules users reach as attributes (``from morphc import zoo``)
_MODULES = {"zoo": "morphc.zoo", "passes": "morphc.passes"}


def __getattr__(name: str):
    if name in _PUBLIC:
        value = getattr(importlib.import_module(_PUBLIC[name]), name)
    elif name in _MODULES:
        value = importlib.import_module(_MODULES[name])
    else:
        raise AttributeError(f"module 'morphc' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_PUBLIC, *_MODULES])


__all__ = sorted([*_PUBLIC, "__version__"])
