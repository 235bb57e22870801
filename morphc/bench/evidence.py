"""The evidence of issue 13: per problem and method, the measures the issue asks for, and whether
each of its targets is met (paired by seed, so seed noise is not read as a loss to plain)."""

from __future__ import annotations

import math

import numpy as np

from morphc.bench.baselines import PLAIN
from morphc.bench.harness import SuiteResult
from morphc.bench.report_markdown import WORSE, num_text

CHEAP = ("perturb", "warm_restarts")
XOR = ("xor", "xor_slow")
STAGNATION = (*XOR, "teacher_student_narrow", "teacher_student", "stationary", "deep_linear")
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
    low, mid, high = float(arr[0]), float(np.median(arr)), float(arr[-1])
    return f"{num_text(mid)} [{num_text(low)}–{num_text(high)}]"


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
    for name in XOR:
        x = ev.get(name, {})
        if "bypass" not in x or PLAIN not in x:
            continue
        b, p, n = x["bypass"], x[PLAIN], x["bypass"]["n"]
        gain = 100 * (b["success"] - p["success"]) / n
        out.append((f"{name}: success ≥ plain + 20 points, no run broken",
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
            cells.append(f"{num_text(float(np.median(r['survival'])), 2)} (n={len(r['survival'])})"
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
