"""``morphc bench``: training evidence, step cost and pass times, in one reproducible run.

Writes into ``--out``: ``results.md`` (headline, training tables, cost and pass-time tables),
``results.json`` (every number: config, each run's loss curve and measures, aggregates, step
costs, pass times), ``headline.md`` (the table for the README), and PNG plots (``loss_<problem>
.png``: loss curves with their spread over seeds; ``cost.png``: measured step-time ratio beside
the FLOP bound). Prints the markdown. Timings are reported, never asserted.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

PARTS = ("training", "cost", "passes")


def _device_available(device: str) -> bool:
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError):
        return False
    return True


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="morphc bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: 2 seeds, short budgets, small cost models, one width, "
                             "torch.compile timed on the MLP only, two models of the HF zoo "
                             "(< 2 min; without it, pass times cover the whole zoo)")
    parser.add_argument("--out", default="bench-results", help="output directory "
                        "(default: bench-results/)")
    parser.add_argument("--only", default=",".join(PARTS),
                        help=f"comma-separated parts to run, from {','.join(PARTS)} (default: all)")
    parser.add_argument("--problems", nargs="+", help="training problems (default: all)")
    parser.add_argument("--methods", nargs="+", help="training methods (default: all)")
    parser.add_argument("--seeds", type=int, help="number of seeds (default 2 quick, 5 full)")
    parser.add_argument("--steps", type=int, help="override every problem's step budget")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--device", default="cpu",
                        help="device of the step-cost part, e.g. cuda (default: cpu)")
    args = parser.parse_args(argv)
    if args.device != "cpu" and not _device_available(args.device):
        parser.error(f"--device {args.device}: no such device on this machine "
                     "(torch.cuda.is_available() is False); the CPU suite is what runs here")
    args.parts = [p.strip() for p in args.only.split(",") if p.strip()]
    unknown = set(args.parts) - set(PARTS)
    if unknown or not args.parts:
        parser.error(f"unknown part(s) {sorted(unknown)}; choose from {','.join(PARTS)}")
    if args.seeds is not None and args.seeds < 1 or args.steps is not None and args.steps < 1:
        parser.error("--seeds and --steps must be positive")
    return args


def _command(argv: Sequence[str] | None) -> str:
    import sys

    args = list(sys.argv[1:] if argv is None else argv)
    if argv is None and args[:1] == ["bench"]:
        args = args[1:]
    return " ".join(["morphc bench", *args])


def _demote(markdown: str) -> str:
    """Nest a section's headings one level deeper."""
    return "\n".join("#" + line if line.startswith("#") else line
                     for line in markdown.splitlines())


def _training(args, out: Path, data: dict) -> list[str]:
    import morphc.bench.methods  # noqa: F401  (registers bypass, growth, linear_bypass)
    from morphc.bench.evidence import format_evidence
    from morphc.bench.harness import run_suite
    from morphc.bench.report_markdown import format_headline, format_markdown
    from morphc.bench.report_plots import plot_curves

    suite = run_suite(args.problems, args.methods, args.seeds, steps=args.steps,
                      quick=args.quick, progress=not args.no_progress)
    data["suite"] = suite
    headline = format_headline(suite)
    evidence = format_evidence(suite)
    (out / "headline.md").write_text(headline + "\n")
    (out / "evidence.md").write_text(evidence + "\n")
    plot_curves(suite, out)
    return ["## Evidence: every method with the same trigger, per problem", "",
            _demote(evidence), "",
            "## Headline: same budget, same seeds, ratio to plain", "", headline, "",
            "## Training", "", _demote(format_markdown(suite, title=None)), ""]


def _cost(args, out: Path, data: dict) -> list[str]:
    from morphc.bench.step_cost import (
        MODEL_LABELS,
        bypass_compile_counts,
        cost_models,
        run_step_costs,
    )
    from morphc.bench.step_cost_format import (
        cost_summary,
        format_compile_counts,
        format_step_costs,
    )

    with tqdm(total=len(cost_models(args.quick)), desc="step cost", unit="model",
              disable=args.no_progress) as bar:
        rows = run_step_costs(args.quick, progress=bar, device=args.device)
    data["step_cost"], data["cost_summary"] = rows, cost_summary(rows)
    data["compile_counts"] = counts = bypass_compile_counts(device=args.device)
    plot_cost(rows, out / "cost.png")
    models = "; ".join(f"`{k}`: {v}" for k, v in MODEL_LABELS.items())
    scale = " (quick: models 4× smaller)" if args.quick else ""
    return ["## Step cost: extended / original, beside the FLOP bound", "",
            f"Every site extended, width a fraction of each site's output size; "
            f"{rows[0]['threads'] if rows else 1} thread(s); models{scale}: {models}.", "",
            format_step_costs(rows), "", format_compile_counts(counts), ""]


def _passes(args, out: Path, data: dict) -> list[str]:
    from morphc.bench.pass_times import MODELS, format_pass_times, hf_models, time_passes

    bar = tqdm([*MODELS, *hf_models()], desc="pass times", unit="model",
               disable=args.no_progress)
    rows = [time_passes(name, quick=args.quick) for name in bar]
    data["pass_times"] = rows
    return ["## Pass times (tracing apart)", "", format_pass_times(rows), "",
            *_zoo(args, data)]


def _zoo(args, data: dict) -> list[str]:
    from morphc.bench.zoo_times import (
        WIDTH,
        format_zoo_times,
        skip_reason,
        time_zoo_model,
        zoo_names,
        zoo_summary,
    )

    title = "### Hugging Face zoo: trace, extend and contract per model"
    reason = skip_reason()
    if reason is not None:
        data["hf_zoo"], data["hf_zoo_skipped"] = [], reason
        return [title, "", reason + ".", ""]
    names = zoo_names(args.quick)
    bar = tqdm(names, desc="HF zoo", unit="model", disable=args.no_progress)
    rows = [time_zoo_model(name) for name in bar]
    data["hf_zoo"] = rows
    which = (f"`--quick`: {len(names)} of the zoo's models" if args.quick
             else f"all {len(names)} models of the zoo")
    return [title, "", f"Tiny configs, random weights ({which}; `morphc.bench.hf_zoo`). Trace: "
            "the first `morphc.trace` (export or symbolic trace), then the same call again, "
            "which must hit the cache; extend: every site, width "
            f"{WIDTH}, tracing apart (the second call; the first in parentheses); 1st call: the "
            "extended model's first forward; contract: after perturbing every branch, with "
            "its verification forward; deviation: contracted vs extended, the largest over the "
            "shapes the model took; another batch / size: the zoo's `alt` inputs, checked "
            "against the model (E1).", "", format_zoo_times(rows), "", zoo_summary(rows), ""]


def plot_cost(rows: list[dict], path: Path) -> Path:
    """Bars: measured step-time ratio per model/width/mode; the FLOP bound and bound + 10% as
    markers."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(6.0, 0.5 * len(rows) + 1), 4.2), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    xs = list(range(len(rows)))
    colours = {"eager": "#4c72b0", "compile": "#dd8452"}
    for mode, colour in colours.items():
        idx = [i for i, r in enumerate(rows) if r["mode"] == mode]
        ax.bar(idx, [rows[i]["step_ratio"] for i in idx], color=colour,
               label=f"measured step-time ratio, {mode}")
    ax.scatter(xs, [r["flop_bound"] for r in rows], marker="_", s=300, color="black",
               zorder=3, label="FLOP bound")
    ax.scatter(xs, [1.1 * r["flop_bound"] for r in rows], marker="_", s=300, color="red",
               zorder=3, label="target: bound + 10%")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xticks(xs, [f"{r['model']} {r['width']} {r['mode']}" for r in rows], fontsize=7,
                  rotation=40, ha="right")
    ax.set_ylabel("step time, extended / original")
    ax.set_title("Cost of a bypass per training step")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    return path


def _header(args, argv, seconds: float) -> list[str]:
    when = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    return ["# morphc bench", "",
            f"`{_command(argv)}` — {when}; torch {torch.__version__}, Python "
            f"{platform.python_version()}, {platform.machine()}, {torch.get_num_threads()} "
            f"default thread(s); {seconds:.0f} s in all.", ""]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the parts asked for, write results.md / results.json / plots, print the markdown."""
    from morphc.bench.report import write_json

    args = _parse(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    data: dict = {}
    body: list[str] = []
    for part, run in (("training", _training), ("cost", _cost), ("passes", _passes)):
        if part in args.parts:
            body += run(args, out, data)
    seconds = time.perf_counter() - start
    markdown = "\n".join(_header(args, argv, seconds) + body)
    (out / "results.md").write_text(markdown + "\n")
    extra = {k: v for k, v in data.items() if k != "suite"}
    extra["run"] = {"command": _command(argv), "seconds": seconds, "parts": args.parts,
                    "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
    write_json(data.get("suite"), out, extra)
    print(markdown)
    print(f"\n`{_command(argv)}` took {seconds:.0f} s; results in {out}/ "
          f"(results.md, results.json, *.png)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
