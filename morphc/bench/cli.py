"""``morphc bench``: training evidence, step cost and pass times, in one reproducible run.

Writes into ``--out``: ``results.md`` (training tables), ``results.json`` (every training
number), ``cost.md`` / ``cost.json`` (step-time ratios beside their FLOP bound, pass times),
and PNG plots (loss curves with spread; cost bars). Timings are reported, never asserted.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path

from tqdm import tqdm

PARTS = ("training", "cost", "passes")


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="morphc bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: 2 seeds, short budgets, small cost models (~2 min)")
    parser.add_argument("--out", default="bench-results", help="output directory")
    parser.add_argument("--only", default=",".join(PARTS),
                        help=f"comma-separated parts to run, from {','.join(PARTS)}")
    parser.add_argument("--problems", nargs="+", help="training problems (default: all)")
    parser.add_argument("--methods", nargs="+", help="training methods (default: all)")
    parser.add_argument("--seeds", type=int, help="seeds (default 2 quick, 5 full)")
    parser.add_argument("--steps", type=int, help="override every problem's step budget")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    args.parts = [p.strip() for p in args.only.split(",") if p.strip()]
    unknown = set(args.parts) - set(PARTS)
    if unknown:
        parser.error(f"unknown part(s) {sorted(unknown)}; choose from {','.join(PARTS)}")
    return args


def _training(args, out: Path) -> str:
    import morphc.bench.methods  # noqa: F401  (registers bypass, growth, linear_bypass)
    from morphc.bench import report
    from morphc.bench.harness import run_suite

    suite = run_suite(args.problems, args.methods, args.seeds, steps=args.steps,
                      quick=args.quick, progress=not args.no_progress)
    report.write_report(suite, out)
    return report.format_markdown(suite)


def _cost(args, out: Path) -> tuple[str, dict]:
    from morphc.bench.pass_times import MODELS, format_pass_times, time_passes
    from morphc.bench.step_cost import cost_models, format_step_costs, run_step_costs

    data: dict = {}
    text = []
    if "cost" in args.parts:
        modes = (False, True)
        with tqdm(total=len(cost_models(args.quick)) * len(modes), desc="step cost",
                  disable=args.no_progress) as bar:
            data["step_cost"] = run_step_costs(args.quick, modes, progress=bar)
        text += ["## Step cost: extended / original, beside the FLOP bound", "",
                 format_step_costs(data["step_cost"]), ""]
        plot_cost(data["step_cost"], out / "cost.png")
    if "passes" in args.parts:
        names = list(MODELS)
        bar = tqdm(names, desc="pass times", disable=args.no_progress)
        data["pass_times"] = [time_passes(n, quick=args.quick) for n in bar]
        text += ["## Pass times (tracing reported apart)", "",
                 format_pass_times(data["pass_times"]), ""]
    return "\n".join(text), data


def plot_cost(rows: list[dict], path: Path) -> None:
    """Bars: measured step-time ratio per model/width/mode, the FLOP bound as a marker."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['model']}\n{r['mode']} {r['width']}" for r in rows]
    fig, ax = plt.subplots(figsize=(max(6, 0.55 * len(rows)), 4))
    xs = range(len(rows))
    ax.bar(xs, [r["step_ratio"] for r in rows], color=["#4c72b0" if r["mode"] == "eager"
                                                        else "#dd8452" for r in rows],
           label="measured step-time ratio (blue eager, orange compiled)")
    ax.scatter(xs, [r["flop_ratio"] for r in rows], marker="_", s=400, color="black",
               label="FLOP-ratio bound", zorder=3)
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xticks(list(xs), labels, fontsize=6)
    ax.set_ylabel("extended / original")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    sections = []
    if "training" in args.parts:
        sections.append(_training(args, out))
    if {"cost", "passes"} & set(args.parts):
        text, data = _cost(args, out)
        (out / "cost.md").write_text(text)
        (out / "cost.json").write_text(json.dumps(data, indent=1))
        sections.append(text)
    command = "morphc bench" + (" --quick" if args.quick else "")
    print("\n\n".join(sections))
    print(f"\n`{command}` took {time.perf_counter() - start:.0f} s; results in {out}/")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
