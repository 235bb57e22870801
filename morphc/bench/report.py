"""Write a suite's results: ``results.md``, ``results.json`` and one loss-curve PNG per problem.

    >>> from morphc.bench.report import write_report
    >>> paths = write_report(suite, "bench-results")     # doctest: +SKIP
    >>> paths["markdown"], paths["json"], paths["plots"]  # doctest: +SKIP

The markdown tables are made by :mod:`morphc.bench.report_markdown`, the plots by
:mod:`morphc.bench.report_plots`; this module writes the files. The JSON holds every number
(config, per-run curves and measures, aggregates) and is strict JSON (non-finite values are
written as ``null``); :func:`load_suite` reads it back.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from morphc.bench.harness import SuiteResult
from morphc.bench.report_markdown import format_markdown
from morphc.bench.report_plots import plot_curves


def _jsonable(value):
    """Recursively replace non-finite floats by None so the file is strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def write_json(suite: SuiteResult | None, out_dir: str | Path, extra: dict | None = None) -> Path:
    """``results.json``: config, problems, methods, every run (with its curve), aggregates, plus
    any ``extra`` sections (``morphc bench`` adds step costs and pass times)."""
    path = Path(out_dir) / "results.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {}
    if suite is not None:
        data = suite.to_dict()
        data["aggregates"] = suite.aggregate()
    data.update(extra or {})
    path.write_text(json.dumps(_jsonable(data), indent=1, allow_nan=False, default=str))
    return path


def load_suite(path: str | Path) -> SuiteResult:
    """Read a ``results.json`` back into a :class:`SuiteResult` (e.g. to re-render plots)."""
    return SuiteResult.from_dict(json.loads(Path(path).read_text()))


def write_markdown(suite: SuiteResult, out_dir: str | Path) -> Path:
    path = Path(out_dir) / "results.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(format_markdown(suite) + "\n")
    return path


def write_report(suite: SuiteResult, out_dir: str | Path) -> dict:
    """All of it: ``{'markdown': Path, 'json': Path, 'plots': [Path, …]}``."""
    return {"markdown": write_markdown(suite, out_dir), "json": write_json(suite, out_dir),
            "plots": plot_curves(suite, out_dir)}
