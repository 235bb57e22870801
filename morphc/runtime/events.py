"""The event log of a Bypass run: ``bp.history`` plus one log line per event."""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping

import torch

logger = logging.getLogger("morphc.bypass")


def plain(value):
    """Make an event field checkpoint-safe (``torch.load(weights_only=True)``)."""
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if isinstance(value, str):
        return str(value)     # StrEnum members become plain strings
    return value


def short(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {short(v)}" for k, v in value.items()) + "}"
    return str(value)


class EventLog:
    """What happened, at which step and loss: a list of plain dicts, each also a log line on the
    ``morphc.bypass`` logger (printed to stderr when ``verbose`` and logging is not set up to show
    it, so it appears exactly once)."""

    def __init__(self, verbose: bool) -> None:
        self.verbose = verbose
        self.events: list[dict] = []

    def add(self, kind: str, **fields) -> dict:
        event = {"event": kind, **{k: plain(v) for k, v in fields.items()}}
        self.events.append(event)
        details = ", ".join(f"{k}={short(v)}" for k, v in event.items()
                            if k not in ("event", "step") and v is not None)
        message = f"step {event.get('step')}: {kind} ({details})"
        logger.info(message)
        shown = logger.isEnabledFor(logging.INFO) and logger.hasHandlers()
        if self.verbose and not shown:
            print(f"[morphc.bypass] {message}", file=sys.stderr)
        return event
