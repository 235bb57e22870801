"""Loss-curve plots of a suite, one PNG per problem.

Plots use matplotlib's Agg canvas directly, without pyplot or any global backend switch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from morphc.bench.baselines import PLAIN
from morphc.bench.harness import SuiteResult
from morphc.bench.training import Smoother


def _smoothed(curves: np.ndarray, beta: float) -> np.ndarray:
    if beta == 0:
        return curves
    out = np.empty_like(curves)
    for i, row in enumerate(curves):
        smoother = Smoother(beta)
        out[i] = [smoother.update(v) for v in row]
    return out


def plot_problem(suite: SuiteResult, problem: str, path: str | Path) -> Path:
    """Loss vs step, log scale: median over seeds and a min–max band per method."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    info = suite.problems[problem]
    beta = 0.0 if info.get("batch_size") is None else 0.9
    fig = Figure(figsize=(7, 4.2), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for method in suite.methods:
        curves = suite.curves(problem, method)
        if curves.size == 0:
            continue
        curves = np.clip(_smoothed(curves, beta), 1e-12, None)
        steps = np.arange(1, curves.shape[1] + 1)
        with np.errstate(all="ignore"):
            lo, mid, hi = (np.nanmin(curves, 0), np.nanmedian(curves, 0),
                           np.nanmax(curves, 0))
        # plain on top, black and dashed, so a method that tracks it exactly stays visible
        style = {"color": "black", "ls": "--", "lw": 1.6, "zorder": 5} if method == PLAIN \
            else {"lw": 1.4}
        (line,) = ax.plot(steps, mid, label=method, **style)
        ax.fill_between(steps, lo, hi, color=line.get_color(), alpha=0.15, lw=0)
    ax.axhline(info["target_loss"], color="grey", ls=":", lw=1.0, label="target")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("train loss" + (" (EMA 0.9)" if beta else ""))
    n = len((suite.config.get("problem_seeds") or {}).get(problem, suite.config.get("seeds", [])))
    ax.set_title(f"{problem}: median and min–max over {n} seeds")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    return Path(path)


def plot_curves(suite: SuiteResult, out_dir: str | Path) -> list[Path]:
    """One ``loss_<problem>.png`` per problem."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return [plot_problem(suite, p, out / f"loss_{p}.png") for p in suite.problems]
