"""Activation families ρ(t; α) as sympy expressions, compiled once into constraints and torch code.

``family`` holds the description and its compiled form, ``derive`` the sympy derivation of C, p and
q, ``torch_code`` the translation into torch functions, ``registry`` the built-ins and the user's.
"""

from morphc.families.derive import derivation_count
from morphc.families.family import ActivationFamily, CompiledFamily, FamilyTypeError
from morphc.families.registry import (
    _REGISTRY,
    available_families,
    get_family,
    register_activation,
)

__all__ = ["_REGISTRY", "ActivationFamily", "CompiledFamily", "FamilyTypeError",
           "available_families", "derivation_count", "get_family", "register_activation"]
