"""The suite's results as markdown: one table per problem, a headline, and where bypass stands.

The markdown says plainly where a method loses to plain: every ratio carries a marker
(``✓ better``, ``= same``, ``✗ WORSE``), each row ends with a verdict, and a summary at the top
lists every loss.
"""

from __future__ import annotations

import math

from morphc.bench.baselines import PLAIN
from morphc.bench.harness import SuiteResult

WORSE, BETTER, SAME = "✗ WORSE", "✓", "="


def num_text(value: float | None, digits: int = 3) -> str:
    """A number as every table shows it: 3 significant digits, '—' when missing, 'diverged'."""
    if value is None:
        return "—"
    if math.isinf(value):
        return "diverged" if value > 0 else "-inf"
    return f"{value:.{digits}g}"


def _spread(s: dict | None) -> str:
    if not s or s["median"] is None:
        return "—"
    return f"{num_text(s['median'])} [{num_text(s['min'])} – {num_text(s['max'])}]"


def _marked(ratio: float | None, is_worse: bool) -> str:
    """'0.12× ✓' / '1× =' / '1.3× ✗ WORSE' ('✗ WORSE' alone when a side diverged)."""
    if ratio is None:
        return WORSE if is_worse else "—"
    mark = WORSE if is_worse else SAME if ratio == 1.0 else BETTER
    return f"{num_text(ratio)}× {mark}"


def _steps_cell(agg: dict) -> str:
    steps = "never" if agg["steps_to_target"] is None else f"{agg['steps_to_target']:.0f}"
    return f"{steps} ({agg['reached_target']}/{agg['n_runs']})"


def _steps_vs_plain(agg: dict, plain: dict, key: str) -> str:
    worse = key in agg["worse_than_plain"]
    if agg["vs_plain"][key] is not None:
        return _marked(agg["vs_plain"][key], worse)
    if plain[key] is None and agg[key] is not None:
        return f"plain never {BETTER}"
    return f"never {WORSE}" if worse else "—"


def _row(method: str, agg: dict, plain: dict | None) -> str:
    vs = agg["vs_plain"] or {}
    worse = agg["worse_than_plain"]
    if method == PLAIN or plain is None:
        verdict, cells = "reference", ["", "", "", "", ""]
    else:
        verdict = ("**worse than plain on " + ", ".join(worse) + "**") if worse \
            else "not worse than plain"
        cells = [_marked(vs["final_loss"], "final_loss" in worse),
                 _marked(vs["metric"], "metric" in worse),
                 _steps_vs_plain(agg, plain, "steps_to_target"),
                 _steps_vs_plain(agg, plain, "seconds_to_target"),
                 "—" if vs["seconds"] is None else f"{vs['seconds']:.2f}×"]
    secs_to_target = num_text(agg["seconds_to_target"])
    return (f"| {method} | {_spread(agg['final_loss'])} | {cells[0]} | {_spread(agg['metric'])} "
            f"| {cells[1]} | {_steps_cell(agg)} | {cells[2]} | {secs_to_target} | {cells[3]} "
            f"| {num_text(agg['seconds']['median'])} | {cells[4]} | {agg['params']} | {verdict} |")


def _problem_section(suite: SuiteResult, name: str, per_method: dict) -> list[str]:
    info = suite.problems[name]
    plain = per_method.get(PLAIN)
    metric = next((a["metric_name"] for a in per_method.values() if a["metric_name"]), "metric")
    direction = "higher is better" if info.get("higher_is_better") else "lower is better"
    batch = "full batch" if info.get("batch_size") is None else f"batch {info['batch_size']}"
    lines = [
        f"### {name}", "", f"{info.get('description', '')}. {suite.config['steps'][name]} "
        f"steps, {batch}, target loss {info['target_loss']:g}, "
        f"{len(suite.config['seeds'])} seeds; median [min – max] over seeds; "
        f"{metric}: {direction}.", "",
        f"| method | final train loss | vs plain | {metric} | vs plain | steps to target "
        "(reached) | vs plain | s to target | vs plain | run s | vs plain | params | verdict |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [_row(m, agg, plain) for m, agg in per_method.items()]
    return lines + [""]


def _losses_summary(aggregates: dict) -> list[str]:
    lines = [f"## Where a method loses to plain ({PLAIN})", ""]
    for problem, per_method in aggregates.items():
        for method, agg in per_method.items():
            if agg["worse_than_plain"]:
                lines.append(f"- **{problem} / {method}**: worse on "
                             + ", ".join(agg["worse_than_plain"]))
    if len(lines) == 2:
        lines.append("- nowhere: every method is at least as good as plain on every measure.")
    return lines + [""]


def format_markdown(suite: SuiteResult, title: str | None = "# morphc bench") -> str:
    """The results as markdown: a summary of losses to plain, then one table per problem."""
    aggregates = suite.aggregate()
    cfg = suite.config
    lines = [] if title is None else [title, ""]
    lines += [
        f"Methods: {', '.join(f'`{m}` ({d})' for m, d in suite.methods.items())}.", "",
        f"Seeds {cfg.get('seeds')}, {'quick' if cfg.get('quick') else 'full'} budget, "
        f"torch {cfg.get('torch')}, {cfg.get('threads')} thread(s), "
        f"{cfg.get('total_seconds', 0):.1f} s in all. Ratios are method / plain of the "
        f"medians; {BETTER} better, {SAME} same, {WORSE} worse than plain.", "",
    ]
    lines += _losses_summary(aggregates)
    lines += ["## Results", ""]
    for problem, per_method in aggregates.items():
        lines += _problem_section(suite, problem, per_method)
    return "\n".join(lines)


# --- headline --------------------------------------------------------------------------------

MORPHC_FIRST = ("bypass", "growth", "linear_bypass")


def _headline_cell(agg: dict, plain: dict) -> str:
    """'0.41× ✓ · test 0.34× ✓' — final-loss and test-metric ratios to plain, marked."""
    worse = agg["worse_than_plain"]
    vs = agg["vs_plain"]
    cell = _marked(vs["final_loss"], "final_loss" in worse)
    if vs["metric"] is not None:
        cell += " · test " + _marked(vs["metric"], "metric" in worse)
    if agg["params"] != plain["params"]:
        cell += f" · {agg['params'] / plain['params']:.1f}× params"
    return cell


def _ordered_methods(methods) -> list[str]:
    first = [m for m in MORPHC_FIRST if m in methods]
    return first + [m for m in methods if m not in first and m != PLAIN]


def format_headline(suite: SuiteResult) -> str:
    """One row per problem: plain's medians, then every method's ratios to plain (final train
    loss · test metric, ✗ where worse), then a line per problem on where ``bypass`` stands."""
    aggregates = suite.aggregate()
    methods = _ordered_methods(suite.methods)
    n_seeds = len(suite.config.get("seeds", []))
    lines = [f"Medians over {n_seeds} seeds (XOR: its own count); each cell: final train loss "
             "ratio to plain · "
             f"test metric ratio (MSE: lower is better, accuracy: higher is better); "
             f"{BETTER} better, {WORSE} worse than plain.", "",
             "| problem | plain: final loss · test | " + " | ".join(methods) + " |",
             "|---|---|" + "---|" * len(methods)]
    for problem, per_method in aggregates.items():
        plain = per_method.get(PLAIN)
        if plain is None:
            continue
        metric = (plain["metric_name"] or "metric").replace("test_", "")
        first = f"{num_text(plain['final_loss']['median'])} · {metric} " \
                f"{num_text(plain['metric']['median']) if plain['metric'] else '—'}"
        cells = [_headline_cell(per_method[m], plain) if m in per_method else "—"
                 for m in methods]
        lines.append(f"| {problem} | {first} | " + " | ".join(cells) + " |")
    verdicts = bypass_verdicts(suite)
    if verdicts:
        lines += ["", "Where `bypass` stands:", ""] + [f"- {v}" for v in verdicts]
    return "\n".join(lines)


def _rank(values: dict[str, float], method: str) -> str:
    """'rank 2/7 (best: `growth`)'; ties share a rank (1 + the number strictly better)."""
    rank = 1 + sum(v < values[method] for v in values.values())
    best = min(values, key=values.get)
    return f"rank {rank}/{len(values)} (best: `{best}`)"


def bypass_verdicts(suite: SuiteResult, method: str = "bypass") -> list[str]:
    """Per problem: bypass's rank by median final train loss and by test metric among all
    methods, the best method, and every measure on which bypass is worse than plain."""
    out = []
    for problem, per_method in suite.aggregate().items():
        if method not in per_method:
            continue
        higher = bool(suite.problems[problem].get("higher_is_better", False))
        loss_of = {m: a["final_loss"]["median"] for m, a in per_method.items()}
        metric_of = {m: (-1 if higher else 1) * a["metric"]["median"]
                     for m, a in per_method.items() if a["metric"]}   # lower is better now
        agg = per_method[method]
        text = f"**{problem}**: final train loss {_rank(loss_of, method)}"
        if method in metric_of:
            text += f", test {_rank(metric_of, method)}"
        cycles = [len(r.extra.get("extended_at") or []) for r in suite.runs
                  if r.problem == problem and r.method == method]
        if cycles and not any(cycles):
            text += "; never triggered (no plateau within the budget), so it equals plain"
        if agg["worse_than_plain"]:
            text += "; **worse than plain on " + ", ".join(agg["worse_than_plain"]) + "**"
        out.append(text + ".")
    return out
