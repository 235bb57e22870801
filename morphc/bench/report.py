"""Write a suite's results: ``results.md``, ``results.json`` and one loss-curve PNG per problem.

    >>> from morphc.bench.report import write_report
    >>> paths = write_report(suite, "bench-results")     # doctest: +SKIP
    >>> paths["markdown"], paths["json"], paths["plots"]  # doctest: +SKIP

The markdown says plainly where a method loses to plain Adam: every ratio carries a marker
(``✓ better``, ``= same``, ``✗ WORSE``), each row ends with a verdict, and a summary at the top
lists every loss. The JSON holds every number (config, per-run curves and measures, aggregates)
and is strict JSON (non-finite values are written as ``null``); :func:`load_suite` reads it back.
Plots use matplotlib's Agg canvas directly, without pyplot or any global backend switch.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from morphc.bench.baselines import PLAIN, Smoother
from morphc.bench.harness import SuiteResult

WORSE, BETTER, SAME = "✗ WORSE", "✓", "="


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


# --- markdown --------------------------------------------------------------------------------


def _num(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "—"
    if math.isinf(value):
        return "diverged" if value > 0 else "-inf"
    return f"{value:.{digits}g}"


def _spread(s: dict | None) -> str:
    if not s or s["median"] is None:
        return "—"
    return f"{_num(s['median'])} [{_num(s['min'])} – {_num(s['max'])}]"


def _marked(ratio: float | None, is_worse: bool) -> str:
    """'0.12× ✓' / '1× =' / '1.3× ✗ WORSE' ('✗ WORSE' alone when a side diverged)."""
    if ratio is None:
        return WORSE if is_worse else "—"
    mark = WORSE if is_worse else SAME if ratio == 1.0 else BETTER
    return f"{_num(ratio)}× {mark}"


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
    secs_to_target = _num(agg["seconds_to_target"])
    return (f"| {method} | {_spread(agg['final_loss'])} | {cells[0]} | {_spread(agg['metric'])} "
            f"| {cells[1]} | {_steps_cell(agg)} | {cells[2]} | {secs_to_target} | {cells[3]} "
            f"| {_num(agg['seconds']['median'])} | {cells[4]} | {agg['params']} | {verdict} |")


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
        first = f"{_num(plain['final_loss']['median'])} · {metric} " \
                f"{_num(plain['metric']['median']) if plain['metric'] else '—'}"
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


def write_markdown(suite: SuiteResult, out_dir: str | Path) -> Path:
    path = Path(out_dir) / "results.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(format_markdown(suite) + "\n")
    return path


# --- plots -----------------------------------------------------------------------------------


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


def write_report(suite: SuiteResult, out_dir: str | Path) -> dict:
    """All of it: ``{'markdown': Path, 'json': Path, 'plots': [Path, …]}``."""
    return {"markdown": write_markdown(suite, out_dir), "json": write_json(suite, out_dir),
            "plots": plot_curves(suite, out_dir)}


# --- the evidence of issue 13: per problem and method, with the targets ----------------------

CHEAP = ("perturb", "warm_restarts")
STAGNATION = ("xor", "teacher_student_narrow", "teacher_student", "stationary", "deep_linear")
MIN_GAIN = 1e-2   # survival is only defined for cycles whose free phase gained ≥ 1 % of the loss


def _runs(suite: SuiteResult, problem: str, method: str) -> list:
    return sorted((r for r in suite.runs if r.problem == problem and r.method == method),
                  key=lambda r: r.seed)


def _clean(v: float | None) -> float:
    return math.inf if v is None or (isinstance(v, float) and math.isnan(v)) else v


def survivals(runs) -> list[float]:
    """Return survival of every closed cycle whose free phase gained ≥ MIN_GAIN (relative)."""
    out = []
    for r in runs:
        for c in r.extra.get("cycles") or []:
            before, free, surv = c.get("loss_before"), c.get("loss_free"), c.get("survival")
            if surv is None or before is None or free is None or not math.isfinite(surv):
                continue
            if before - free >= MIN_GAIN * abs(before):
                out.append(surv)
    return out


def paired_worse(runs, plain_runs, key, higher_is_better=False, tol=0.01) -> bool:
    """Worse than plain beyond seed noise: worse on ≥ 80 % of the seeds (paired by seed) and the
    median paired relative difference beyond ``tol``. Failure rows (NaN) count as worse."""
    plain = {r.seed: r for r in plain_runs}
    diffs = []
    for r in runs:
        if r.seed not in plain:
            continue
        a, b = getattr(r, key), getattr(plain[r.seed], key)
        if a is None or b is None:
            continue
        a, b = _clean(a), _clean(b)
        if higher_is_better:
            a, b = -a, -b
        if math.isinf(a) and a > 0:
            diffs.append(math.inf)
            continue
        diffs.append((a - b) / max(abs(b), 1e-12))
    if not diffs:
        return False
    worse = sum(d > tol for d in diffs)
    return worse >= 0.8 * len(diffs) and float(np.median(diffs)) > tol


def _gap_closed(runs, plain_runs) -> list[float]:
    """Per seed: (plain − method) / (plain − best loss of the width)."""
    plain = {r.seed: r for r in plain_runs}
    out = []
    for r in runs:
        ref = r.extra.get("reference_loss")
        p = plain.get(r.seed)
        if ref is None or p is None or not p.final_loss > ref:
            continue
        out.append((p.final_loss - r.final_loss) / (p.final_loss - ref))
    return out


def _fmt_spread(values) -> str:
    values = [_clean(v) for v in values]
    if not values:
        return "—"
    arr = np.sort(np.array(values, dtype=float))
    return f"{_num(float(np.median(arr)))} [{_num(float(arr[0]))}–{_num(float(arr[-1]))}]"


def evidence(suite: SuiteResult) -> dict:
    """Per problem and method, the measures issue 13 asks for; and the targets."""
    out: dict = {}
    for problem, info in suite.problems.items():
        higher = bool(info.get("higher_is_better", False))
        plain_runs = _runs(suite, problem, PLAIN)
        plain_secs = float(np.median([r.seconds for r in plain_runs])) if plain_runs else None
        rows = {}
        for method in suite.methods:
            runs = _runs(suite, problem, method)
            if not runs:
                continue
            row = {
                "n": len(runs),
                "final_loss": [r.final_loss for r in runs],
                "metric": [r.metric_value for r in runs if r.metric_value is not None],
                "metric_name": runs[0].metric_name,
                "survival": survivals(runs),
                "started": sum(len(r.extra.get("extended_at") or []) for r in runs),
                "accepted": sum(len(r.extra.get("contracted_at") or []) for r in runs),
                "wall": (float(np.median([r.seconds for r in runs])) / plain_secs)
                if plain_secs else None,
                "worse_loss": method != PLAIN and paired_worse(runs, plain_runs, "final_loss"),
                "worse_metric": method != PLAIN and paired_worse(
                    runs, plain_runs, "metric_value", higher),
            }
            if info.get("success_loss") is not None:
                ok = {r.seed: bool(r.extra.get("success")) for r in runs}
                base = {r.seed: bool(r.extra.get("success")) for r in plain_runs}
                row["success"] = sum(ok.values())
                row["rescued"] = sum(ok[s] and not base.get(s, True) for s in ok)
                row["broken"] = sum(base.get(s, False) and not ok[s] for s in ok)
            if any("reference_loss" in r.extra for r in runs):
                row["reference"] = [r.extra["reference_loss"] for r in runs]
                row["gap_closed"] = _gap_closed(runs, plain_runs)
            rows[method] = row
        out[problem] = rows
    return out


def _worse_than_cheap(rows: dict, method: str = "bypass") -> list[str]:
    me = float(np.median([_clean(v) for v in rows[method]["final_loss"]]))
    return [c for c in CHEAP if c in rows and
            float(np.median([_clean(v) for v in rows[c]["final_loss"]])) < 0.5 * me]


def targets(suite: SuiteResult) -> list[tuple[str, str, bool | None]]:
    """(target, measured, met) for every target of issue 13 the suite can judge."""
    ev = evidence(suite)
    out: list[tuple[str, str, bool | None]] = []
    surv = [s for p in STAGNATION if p in ev and "bypass" in ev[p] for s in ev[p]["bypass"]
            ["survival"]]
    if surv:
        med = float(np.median(surv))
        out.append(("median return survival ≥ 80 % over the stagnation problems' cycles",
                    f"{100 * med:.0f} % over {len(surv)} cycles", med >= 0.8))
    x = ev.get("xor", {})
    if "bypass" in x and PLAIN in x:
        b, p, n = x["bypass"], x[PLAIN], x["bypass"]["n"]
        gain = 100 * (b["success"] - p["success"]) / n
        out.append(("XOR success ≥ plain + 20 points, no run broken",
                    f"plain {p['success']}/{n}, bypass {b['success']}/{n} ({gain:+.0f} points), "
                    f"{b['rescued']} rescued, {b['broken']} broken",
                    gain >= 20 and b["broken"] == 0))
    n = ev.get("teacher_student_narrow", {})
    if "bypass" in n and n["bypass"].get("gap_closed"):
        med = float(np.median(n["bypass"]["gap_closed"]))
        out.append(("under-parameterised teacher–student closes ≥ ½ the gap to the width's best",
                    f"median gap closed {med:.2f} ({_fmt_spread(n['bypass']['gap_closed'])})",
                    med >= 0.5))
    s = ev.get("teacher_student", {})
    if "bypass" in s and PLAIN in s:
        ratio = float(np.median(s["bypass"]["final_loss"]) / np.median(s[PLAIN]["final_loss"]))
        out.append(("symmetric saddle: final loss ≤ 0.01 × plain", f"{ratio:.2g} × plain",
                    ratio <= 0.01))
    st = ev.get("stationary", {})
    if {"bypass", "linear_bypass", PLAIN} <= set(st):
        p0 = float(np.median(st[PLAIN]["final_loss"]))
        esc = {m: float(np.median(st[m]["final_loss"])) < 0.5 * p0 for m in st if m != PLAIN}
        others = [m for m, e in esc.items() if e and m not in ("bypass", "growth")]
        out.append(("exactly stationary point escaped by the non-linear branch only",
                    "escaped by: " + (", ".join(m for m, e in esc.items() if e) or "nobody"),
                    esc["bypass"] and not esc["linear_bypass"] and not others))
    worse = [f"{p} ({'loss' if r['bypass']['worse_loss'] else ''}"
             f"{' ' if r['bypass']['worse_loss'] and r['bypass']['worse_metric'] else ''}"
             f"{'test' if r['bypass']['worse_metric'] else ''})"
             for p, r in ev.items() if "bypass" in r and
             (r["bypass"]["worse_loss"] or r["bypass"]["worse_metric"])]
    out.append(("on every problem bypass no worse than plain (train loss, test) beyond seed noise",
                "worse on: " + (", ".join(worse) or "none"), not worse))
    walls = {p: r["bypass"]["wall"] for p, r in ev.items() if "bypass" in r and r["bypass"]["wall"]}
    if walls:
        top = max(walls, key=walls.get)
        out.append(("wall-clock of a whole run ≤ 1.3 × plain",
                    f"median over problems {np.median(list(walls.values())):.2f}×, worst {top} "
                    f"{walls[top]:.2f}×", max(walls.values()) <= 1.3))
    return out


def format_evidence(suite: SuiteResult) -> str:
    """Per problem: one row per method with the measures of issue 13; then the targets."""
    ev = evidence(suite)
    seeds = suite.config.get("problem_seeds") or {}
    lines = []
    for problem, rows in ev.items():
        info = suite.problems[problem]
        plain = rows.get(PLAIN)
        metric = (next((r["metric_name"] for r in rows.values() if r["metric_name"]), "metric")
                  or "metric").replace("test_", "test ")
        success = info.get("success_loss") is not None
        lines += [f"### {problem}", "",
                  f"{info.get('description', '')}. {suite.config['steps'][problem]} steps, "
                  f"{len(seeds.get(problem, suite.config.get('seeds', [])))} seeds; "
                  "median [min–max] over seeds."
                  + (f" Success: final loss < {info['success_loss']:g}." if success else ""), ""]
        if "reference" in (plain or {}):
            lines += [f"Best loss this width reaches (best of the restarts, per seed): "
                      f"{_fmt_spread(plain['reference'])}; gap closed = (plain − method) / "
                      "(plain − best), per seed.", ""]
        head = "| method | final train loss | " + metric + " | "
        head += "success (rescued / broken) | " if success else ""
        head += "gap closed | " if "reference" in (plain or {}) else ""
        head += "survival per cycle | cycles started / kept | wall × plain | verdict |"
        lines += [head, "|" + "---|" * (head.count("|") - 1)]
        for method, r in rows.items():
            cells = [f"`{method}`", _fmt_spread(r["final_loss"]), _fmt_spread(r["metric"])]
            if success:
                cells.append(f"{r['success']}/{r['n']} ({r['rescued']} / {r['broken']})")
            if "reference" in (plain or {}):
                cells.append(_fmt_spread(r.get("gap_closed") or []) if method != PLAIN else "—")
            cells.append(f"{_num(float(np.median(r['survival'])), 2)} (n={len(r['survival'])})"
                         if r["survival"] else "—")
            cells.append(f"{r['started']} / {r['accepted']}")
            cells.append("—" if r["wall"] is None else f"{r['wall']:.2f}")
            verdict = []
            if r["worse_loss"]:
                verdict.append(f"{WORSE} train loss")
            if r["worse_metric"]:
                verdict.append(f"{WORSE} test")
            if method == "bypass":
                beaten = _worse_than_cheap(rows)
                if beaten:
                    verdict.append("**beaten by " + ", ".join(beaten) + "**")
            cells.append("reference" if method == PLAIN else "; ".join(verdict) or "ok")
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["### Targets (issue 13)", "", "| target | measured | met |", "|---|---|---|"]
    for name, measured, met in targets(suite):
        lines.append(f"| {name} | {measured} | {'yes' if met else '**no**'} |")
    return "\n".join(lines)
