"""The one path by which morphc writes into a user's weights: all-or-nothing.

compute (the caller) → cast to each parameter's dtype → check finite *after* the cast → write →
verify (the caller's check, against the user's own model) → keep; on any failure, restore the
saved values bit for bit and raise. Contraction, Bypass cycles and model-space moves all use it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn

from morphc.errors import ContractionError


def write_weights(params: Mapping[str, nn.Parameter], new_values: Mapping[str, torch.Tensor], *,
                  verify: Callable[[], None] | None = None, what: str = "folding") -> None:
    """Write ``new_values`` into ``params`` (same names) in place, keeping the Parameter objects.

    ``verify()`` runs after the write and raises to refuse it; the saved values are then written
    back and the exception propagates (so do KeyboardInterrupt and the like).
    """
    cast = {name: value.detach().to(params[name].dtype) for name, value in new_values.items()}
    bad = [name for name, value in cast.items() if not torch.isfinite(value).all()]
    if bad:
        dtypes = sorted({str(params[n].dtype) for n in bad})
        raise ContractionError(
            f"{what} gives non-finite values in {bad} once cast to {', '.join(dtypes)}; the "
            "weights were left untouched. Check the extension parameters for NaN/Inf, or keep "
            "the model in a wider dtype while extended.")
    saved = {name: params[name].detach().clone() for name in cast}
    try:
        with torch.no_grad():
            for name, value in cast.items():
                params[name].copy_(value)
        if verify is not None:
            verify()
    except BaseException:
        with torch.no_grad():
            for name, value in saved.items():
                params[name].copy_(value)
        raise
