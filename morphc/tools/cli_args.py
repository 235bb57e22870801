"""The ``morphc`` command's argument types and its one-line error (no torch at import time).

Each ``parse_*`` turns one option's text into a value or raises ``argparse.ArgumentTypeError``
with an example of what to write, which argparse reports as a usage error (exit 2).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path


class CLIError(Exception):
    """A failure to report as one line (exit 1); the message says what to do."""


def one_line(error: BaseException) -> str:
    """An exception's message on one line, at most 700 characters."""
    text = " ".join(str(error).split())
    return text if len(text) <= 700 else text[:697] + "..."


def _writable(path, flag: str, kind: str, check) -> None:
    """Run ``check(Path(path))``; an OSError becomes a ``CLIError`` naming ``flag``."""
    try:
        check(Path(path))
    except OSError as e:
        raise CLIError(f"cannot write to {flag} {path}: {e.strerror or e}; choose a writable "
                       f"{kind}") from e


def _make_writable(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    if not os.access(directory, os.W_OK):
        raise PermissionError(13, "Permission denied")


def _file_writable(target: Path) -> None:
    if target.is_dir():
        raise IsADirectoryError(21, "Is a directory")
    if target.exists() and not os.access(target, os.W_OK):
        raise PermissionError(13, "Permission denied")
    _make_writable(target.parent)


def writable_dir(path, flag: str) -> Path:
    """``path`` as a directory that exists (made if need be) and can be written to, else a
    ``CLIError`` naming ``flag``: checked before minutes of work, not after them."""
    _writable(path, flag, "directory", _make_writable)
    return Path(path)


def writable_file(path, flag: str) -> None:
    """A file ``flag`` will write, checked as :func:`writable_dir` checks a directory: its
    directory can be written, and it is neither a directory nor a read-only file."""
    _writable(path, flag, "file path", _file_writable)


def parse_shape(text: str) -> tuple[int, ...]:
    """``"1,3,32,32"`` → ``(1, 3, 32, 32)``; every dimension a positive int."""
    parts = [p.strip() for p in text.replace("x", ",").split(",")]
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        shape = ()
    if not shape or any(d <= 0 for d in shape):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a shape; write positive integers separated by commas, "
            "e.g. --input-shape 1,3,32,32")
    return shape


def parse_dtype(text: str):
    import torch

    dtype = getattr(torch, text.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a torch dtype; use e.g. float32, float64, bfloat16, int64")
    return dtype


def parse_width(text: str) -> int | float:
    try:
        value = float(text) if any(c in text for c in ".eE") else int(text)
    except ValueError:
        value = 0
    if value <= 0 or (isinstance(value, float) and value > 1):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a width; give a unit count (e.g. 8) or a fraction in (0, 1] "
            "of each site's output size (e.g. 0.25)")
    return value


def parse_sites(text: str):
    """``all`` / ``auto`` / a comma-separated list of site names or patterns."""
    if text in ("all", "auto"):
        return text
    names = [s.strip() for s in text.split(",") if s.strip()]
    if not names:
        raise argparse.ArgumentTypeError("give 'all', 'auto' or comma-separated site names")
    return names

