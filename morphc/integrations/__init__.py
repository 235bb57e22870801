"""Bypass inside other people's trainers.

- ``morphc.integrations.hf.BypassCallback``: a ``transformers.TrainerCallback`` (``pip install
  'morphc[hf]'``).
- ``morphc.integrations.lightning.BypassCallback``: a ``lightning.Callback`` (``pip install
  'morphc[lightning]'``).
- :class:`~morphc.integrations.core.TrainerBypass`: the trainer-independent core both drive, for
  writing a callback for another trainer.

The trainers are imported only when their callback is used.
"""

import importlib

_PUBLIC = {"TrainerBypass": "morphc.integrations.core",
           "InPlaceExtension": "morphc.integrations.extension",
           "module_sites": "morphc.integrations.sites"}
_MODULES = ("hf", "lightning")


def __getattr__(name: str):
    if name in _PUBLIC:
        value = getattr(importlib.import_module(_PUBLIC[name]), name)
    elif name in _MODULES:
        value = importlib.import_module(f"morphc.integrations.{name}")
    else:
        raise AttributeError(f"module 'morphc.integrations' has no attribute {name!r}")
    globals()[name] = value
    return value


__all__ = sorted([*_PUBLIC, *_MODULES])
