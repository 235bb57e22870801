"""Graphviz DOT, the low-level part: quoting text as a DOT string, and rendering DOT to a file.

Everything that draws DOT (fx graphs in ``morphc.tools.pictures``, the model-space graph in
``morphc.space.space_files``) quotes its labels and calls Graphviz through here, so escaping and
the subprocess call are written once::

    >>> dot_string('say "hi"\\n')
    '"say \\\\"hi\\\\"\\\\n"'
    >>> render('digraph { a -> b }', "g.svg")   # doctest: +SKIP
    PosixPath('g.svg')
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from morphc.errors import MorphcError

RENDERED_FORMATS = ("svg", "png", "pdf")


class VizError(MorphcError):
    """A picture cannot be produced (e.g. Graphviz is missing for .png/.svg rendering)."""


def dot_string(text) -> str:
    """A DOT double-quoted string: quotes and backslashes escaped, newlines as ``\\n``."""
    text = str(text).replace("\\", "\\\\").replace('"', '\\"')
    return '"' + text.replace("\r", "").replace("\n", "\\n") + '"'


def graphviz_available() -> bool:
    """Whether the Graphviz ``dot`` executable is on ``PATH``."""
    return shutil.which("dot") is not None


def render(dot_source: str, path: str | Path) -> Path:
    """Write ``dot_source`` to ``path``: ``.dot``/``.gv`` as text, ``.svg``/``.png``/``.pdf``
    through the Graphviz ``dot`` executable. Raises :class:`VizError` saying what to do when
    Graphviz is missing, fails or takes too long."""
    path = Path(path)
    fmt = path.suffix.lower().lstrip(".")
    if fmt in ("dot", "gv"):
        path.write_text(dot_source, encoding="utf-8")
        return path
    if fmt not in RENDERED_FORMATS:
        raise VizError(f"cannot render {path.name}: use a .svg, .png, .pdf or .dot file name")
    exe = shutil.which("dot")
    if exe is None:
        raise VizError(
            f"rendering {path.name} needs the Graphviz 'dot' program, which is not installed; "
            "install it (apt-get install graphviz / brew install graphviz / conda install "
            "graphviz), or write a .dot file (always works), or use morphc.tools.pictures.to_svg / "
            "write_html, which need no Graphviz")
    try:
        done = subprocess.run([exe, f"-T{fmt}", "-o", str(path)], input=dot_source.encode(),
                              capture_output=True, timeout=300, check=False)
    except subprocess.TimeoutExpired as e:
        raise VizError(f"Graphviz took over {e.timeout:.0f} s on {path.name}; write a .dot "
                       "file or use to_svg/write_html for big graphs") from e
    if done.returncode != 0:
        message = " ".join(done.stderr.decode(errors="replace").split())[:300]
        raise VizError(f"Graphviz failed to render {path.name}: {message}")
    return path
