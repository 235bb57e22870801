"""Run every (problem, method, seed) under one budget and aggregate the numbers.

    >>> from morphc.bench.harness import run_suite
    >>> suite = run_suite(["diabetes"], ["adam", "sgd_momentum"], seeds=2, quick=True,
    ...                   progress=False)
    >>> agg = suite.aggregate()["diabetes"]["sgd_momentum"]
    >>> sorted(agg["vs_plain"])
    ['final_loss', 'metric', 'seconds', 'seconds_to_target', 'steps_to_target']

Runs are interleaved (for each problem and seed, every method in turn) so that machine noise
hits all methods alike. Each run seeds torch, numpy and ``random`` from its seed and runs with
``threads`` intra-op threads (1 by default: deterministic and, for models this small, fastest).
Aggregates are medians and spreads over seeds, and ratios to plain Adam
(:data:`~morphc.bench.baselines.PLAIN`); ``worse_than_plain`` lists, per method, every measure on
which it loses to plain.
"""

from __future__ import annotations

import math
import platform
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from morphc.bench.baselines import PLAIN, get_methods
from morphc.bench.problems import Problem, get_problems
from morphc.bench.training import Method, RunResult

QUICK_SEEDS, FULL_SEEDS = 2, 3

__all__ = ["RunResult", "SuiteResult", "aggregate", "run_suite", "stats"]


@dataclass
class SuiteResult:
    """All runs of one suite plus what is needed to read them without the code that made them."""

    runs: list[RunResult]
    problems: dict[str, dict]           # name -> Problem.info()
    methods: dict[str, str]             # name -> description, in run order
    config: dict = field(default_factory=dict)

    def aggregate(self) -> dict[str, dict[str, dict]]:
        return aggregate(self)

    def curves(self, problem: str, method: str) -> np.ndarray:
        """Loss curves of one (problem, method), one row per seed (NaN-padded to equal length)."""
        rows = [r.losses for r in self.runs if r.problem == problem and r.method == method]
        width = max((len(r) for r in rows), default=0)
        return np.array([list(r) + [math.nan] * (width - len(r)) for r in rows], dtype=float)

    def to_dict(self) -> dict:
        return {"config": self.config, "problems": self.problems, "methods": self.methods,
                "runs": [asdict(r) for r in self.runs]}

    @classmethod
    def from_dict(cls, data: dict) -> SuiteResult:
        """Inverse of :meth:`to_dict` (JSON ``null`` in a loss curve reads back as NaN)."""
        runs = []
        for r in data["runs"]:
            r = dict(r)
            r["losses"] = [math.nan if v is None else v for v in r["losses"]]
            r["final_loss"] = math.nan if r["final_loss"] is None else r["final_loss"]
            runs.append(RunResult(**r))
        return cls(runs, data["problems"], data["methods"], data.get("config", {}))


# --- running ---------------------------------------------------------------------------------


def _resolve_seeds(seeds, quick: bool) -> list[int]:
    if seeds is None:
        seeds = QUICK_SEEDS if quick else FULL_SEEDS
    return list(range(seeds)) if isinstance(seeds, int) else list(seeds)


def _run_one(problem: Problem, method: Method, seed: int, steps: int) -> RunResult:
    result = method.run(problem, seed, steps, None)
    if len(result.losses) != steps:
        raise RuntimeError(
            f"method {method.name!r} on {problem.name!r} (seed {seed}) returned "
            f"{len(result.losses)} losses for {steps} steps; a method must record one per step")
    return result


def run_suite(problems: Sequence[Problem | str] | None = None,
              methods: Sequence[Method | str] | None = None,
              seeds: int | Sequence[int] | None = None, steps: int | None = None,
              quick: bool = False, progress: bool = True, threads: int | None = 1) -> SuiteResult:
    """Run every (problem, method, seed); ``None`` means all problems / all registered methods.

    ``steps`` overrides every problem's budget; otherwise each problem's ``quick_steps`` or
    ``steps`` is used. ``seeds`` is a count or an explicit list (default 2 quick, 5 full).
    ``threads`` sets torch's intra-op threads for the duration (None leaves them alone).
    """
    from tqdm.auto import tqdm

    problems, methods = get_problems(problems), get_methods(methods)
    default_seeds = _resolve_seeds(seeds, quick)
    own = {p.name: (p.quick_seeds if quick else p.seeds) for p in problems}
    per_problem = {name: default_seeds if seeds is not None or not n else list(range(n))
                   for name, n in own.items()}
    budget = {p.name: steps or (p.quick_steps if quick else p.steps) for p in problems}
    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    runs: list[RunResult] = []
    start = time.perf_counter()
    bar = tqdm(total=len(methods) * sum(map(len, per_problem.values())), disable=not progress,
               desc="bench", unit="run")
    try:
        for problem in problems:
            for seed in per_problem[problem.name]:
                for method in methods:
                    bar.set_postfix_str(f"{problem.name} · {method.name} · seed {seed}")
                    runs.append(_run_one(problem, method, seed, budget[problem.name]))
                    bar.update(1)
    finally:
        bar.close()
        torch.set_num_threads(old_threads)
    config = {"seeds": default_seeds, "problem_seeds": per_problem, "quick": quick,
              "steps": budget, "threads": threads,
              "plain": PLAIN, "torch": torch.__version__, "python": platform.python_version(),
              "machine": platform.machine(), "total_seconds": time.perf_counter() - start}
    return SuiteResult(runs, {p.name: p.info() for p in problems},
                       {m.name: m.description for m in methods}, config)


# --- aggregation -----------------------------------------------------------------------------


def _quantile(ordered: np.ndarray, q: float) -> float:
    """Linear-interpolation quantile of sorted values that may contain +inf (numpy gives NaN)."""
    pos = q * (len(ordered) - 1)
    lo, hi = int(math.floor(pos)), int(math.ceil(pos))
    a, b = float(ordered[lo]), float(ordered[hi])
    if lo == hi or a == b or math.isinf(a):
        return a
    return b if math.isinf(b) else a + (b - a) * (pos - lo)


def stats(values: Sequence[float]) -> dict:
    """median, min, max and quartiles; NaN values (diverged runs) count as +inf (worst)."""
    arr = np.sort(np.array([math.inf if v is None or math.isnan(v) else v for v in values],
                           dtype=float))
    if arr.size == 0:
        return {"median": None, "min": None, "max": None, "q25": None, "q75": None, "n": 0}
    return {"median": _quantile(arr, 0.5), "min": float(arr[0]), "max": float(arr[-1]),
            "q25": _quantile(arr, 0.25), "q75": _quantile(arr, 0.75), "n": int(arr.size)}


def _median_or_none(values: Sequence[float | None]) -> float | None:
    """Median where ``None`` (never reached) counts as +inf; ``None`` if the median is +inf."""
    if not values:
        return None
    median = stats([math.inf if v is None else v for v in values])["median"]
    return None if math.isinf(median) else median


def _ratio(value: float | None, plain: float | None) -> float | None:
    if value is None or plain is None or not math.isfinite(value) or not math.isfinite(plain):
        return None
    if plain == 0:
        return 1.0 if value == 0 else math.inf
    return value / plain


def _summarise(runs: list[RunResult], higher_is_better: bool) -> dict:
    metric_values = [r.metric_value for r in runs if r.metric_value is not None]
    if higher_is_better:   # a diverged run is the worst, whichever way the metric points
        metric_values = [-math.inf if math.isnan(v) else v for v in metric_values]
    return {
        "n_runs": len(runs),
        "final_loss": stats([r.final_loss for r in runs]),
        "metric_name": next((r.metric_name for r in runs if r.metric_name), None),
        "metric": stats(metric_values) if metric_values else None,
        "steps_to_target": _median_or_none([r.steps_to_target for r in runs]),
        "seconds_to_target": _median_or_none([r.seconds_to_target for r in runs]),
        "reached_target": sum(r.steps_to_target is not None for r in runs),
        "seconds": stats([r.seconds for r in runs]),
        "params": int(np.median([r.params for r in runs])),
    }


def _compare(agg: dict, plain: dict, higher_is_better: bool) -> tuple[dict, list[str]]:
    """Ratios method/plain for each measure, and the measures on which the method loses."""
    def med(a, key):
        return a[key]["median"] if a.get(key) else None

    ratios = {
        "final_loss": _ratio(med(agg, "final_loss"), med(plain, "final_loss")),
        "metric": _ratio(med(agg, "metric"), med(plain, "metric")),
        "steps_to_target": _ratio(agg["steps_to_target"], plain["steps_to_target"]),
        "seconds_to_target": _ratio(agg["seconds_to_target"], plain["seconds_to_target"]),
        "seconds": _ratio(med(agg, "seconds"), med(plain, "seconds")),
    }
    worse = []
    if med(agg, "final_loss") > med(plain, "final_loss"):
        worse.append("final_loss")
    if agg["metric"] and plain["metric"]:
        m, p = med(agg, "metric"), med(plain, "metric")
        if (m < p) if higher_is_better else (m > p):
            worse.append("metric")
    for key in ("steps_to_target", "seconds_to_target"):
        m, p = agg[key], plain[key]
        if p is not None and (m is None or m > p):
            worse.append(key)
    return ratios, worse


def aggregate(suite: SuiteResult) -> dict[str, dict[str, dict]]:
    """``{problem: {method: summary}}`` with medians, spreads, ratios to plain and losses.

    ``summary['vs_plain']`` holds method/plain ratios of medians (``None`` when a side never
    reached the target or plain was not run); ``summary['worse_than_plain']`` lists the measures
    (final_loss, metric, steps_to_target, seconds_to_target) on which the method is worse.
    Wall-clock per run (``seconds``) is a cost, reported as a ratio but never listed as a loss.
    """
    out: dict[str, dict[str, dict]] = {}
    for problem, info in suite.problems.items():
        higher = bool(info.get("higher_is_better", False))
        per_method = {}
        for method in suite.methods:
            runs = [r for r in suite.runs if r.problem == problem and r.method == method]
            if runs:
                per_method[method] = _summarise(runs, higher)
        plain = per_method.get(PLAIN)
        for agg in per_method.values():
            if plain is None:
                agg["vs_plain"], agg["worse_than_plain"] = None, []
            else:
                agg["vs_plain"], agg["worse_than_plain"] = _compare(agg, plain, higher)
        out[problem] = per_method
    return out
