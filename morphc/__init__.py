"""morphc: a model-morphism compiler for PyTorch.

Extend a model with bypass branches that change nothing, train in the larger space, and fold the
branches back into the model's own weights, exactly.
"""

from morphc.api import contract, extend
from morphc.errors import (
    BypassError,
    ContractionError,
    FamilyError,
    MorphcError,
    PassError,
    SiteError,
    TraceError,
)
from morphc.extended import ExtendedModel
from morphc.families import available_families, register_activation
from morphc.frontend import trace
from morphc.inspection import InspectionReport, inspect

__version__ = "0.1.0"

# Heavier parts load on first use, so `import morphc` stays cheap.
_LAZY = {
    "Bypass": "morphc.bypass",
    "Plateau": "morphc.triggers",
    "GradientNorm": "morphc.triggers",
    "Schedule": "morphc.triggers",
    "Trigger": "morphc.triggers",
    "ModelSpace": "morphc.space",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'morphc' has no attribute {name!r}")

__all__ = [
    "Bypass",
    "GradientNorm",
    "ModelSpace",
    "Plateau",
    "Schedule",
    "Trigger",
    "BypassError",
    "ContractionError",
    "ExtendedModel",
    "FamilyError",
    "MorphcError",
    "PassError",
    "SiteError",
    "TraceError",
    "__version__",
    "InspectionReport",
    "available_families",
    "contract",
    "extend",
    "inspect",
    "register_activation",
    "trace",
]
