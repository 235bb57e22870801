"""Where in the user's code a trace failed: the last frame of the model's own source.

torch.export's own "Caused by" names a line of torch (``non_strict_utils.py``) for a guard
raised inside a tensor operation; the line a user can change is the last frame of the traceback
outside torch and morphc (``modeling_wav2vec2.py:1610: if labels is not None and
labels.max() >= ...``). Naming it, and the loss targets among the inputs, says what to change.
"""

from __future__ import annotations

import linecache
import os
import traceback

import torch

_OURS = (os.path.dirname(torch.__file__), os.path.dirname(os.path.dirname(__file__)))
# inputs from which models compute their own loss (Hugging Face, Lightning-style heads)
LOSS_INPUTS = ("labels", "start_positions", "end_positions", "next_sentence_label",
               "mc_labels", "return_loss")


def model_line(exc: BaseException | None) -> str | None:
    """``path:line in function: source`` of the deepest model frame behind ``exc`` (its causes
    included), or None."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        frames = [f for f in traceback.extract_tb(exc.__traceback__)
                  if not f.filename.startswith(_OURS) and not f.filename.startswith("<")]
        if frames:
            f = frames[-1]
            path = f.filename.split("site-packages" + os.sep)[-1]
            source = linecache.getline(f.filename, f.lineno).strip()
            return f"{path}:{f.lineno} in {f.name}" + (f": {source}" if source else "")
        exc = exc.__cause__ or exc.__context__
    return None


def loss_hint(kwargs: dict) -> str:
    """Advice when the inputs ask the model for its own loss, whose code is often what defeats
    tracing (label checks, masked selects of valid targets)."""
    given = [k for k in LOSS_INPUTS if kwargs.get(k) is not None and kwargs.get(k) is not False]
    if not given:
        return ""
    return (f" The inputs ask the model for its own loss ({', '.join(given)}=): if that line is "
            "in the loss, extend without them and compute the loss from the outputs in your "
            "closure.")
