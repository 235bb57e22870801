"""The step-cost results as markdown, with the targets and whether they are met."""

from __future__ import annotations


def cost_summary(rows: list[dict]) -> dict:
    """The targets, met or not, with the rows that miss them."""
    compiled = [r for r in rows if r["mode"] == "compile"]
    miss_bound = [f"{r['model']} {r['width']}" for r in compiled if not r["within_target"]]
    slower = [f"{r['model']} {r['width']}" for r in compiled
              if r["compiled_not_slower_than_eager"] is False]
    eager = [r for r in rows if r.get("eager_target_met") is not None]
    miss_eager = [f"{r['model']} {r['width']}" for r in eager if not r["eager_target_met"]]
    return {"compiled_within_10pct_of_bound": not miss_bound and bool(compiled),
            "misses_bound": miss_bound,
            "compiled_not_slower_than_eager": not slower and bool(compiled),
            "compiled_slower_than_eager": slower,
            "eager_within_1_15": (not miss_eager) if eager else None,
            "misses_eager_target": miss_eager}


def _verdict(met: bool | None, misses: list[str]) -> str:
    if met is None:
        return "not measured"
    return "**met**" if met else "**not met** (" + ", ".join(misses) + ")"


def format_step_costs(rows: list[dict]) -> str:
    """Markdown table: every ratio against the user's fastest original (any mode)."""
    lines = ["| model | width | mode | fastest original ms (which) | extended ms | "
             "ratio | FLOP bound | over bound | within 10% | same-mode ratio | "
             "compiled / eager (extended) | peak step MB, extended / original |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        not_slower = r["compiled_not_slower_than_eager"]
        vs_eager = "" if not_slower is None else \
            f"{r['step_ms'] / r['eager_step_ms']:.2f}×" + ("" if not_slower else " **slower**")
        memory = "" if "peak_step_mb" not in r else \
            f"{r['peak_step_mb']:.1f} / {r['original_peak_step_mb']:.1f}"
        lines.append(
            f"| {r['model']} | {r['width']} | {r['mode']} | "
            f"{r.get('original_ms', r['original_user_ms']):.2f} "
            f"({r.get('fastest_original', 'user')}) | {r['step_ms']:.2f} | "
            f"{r['step_ratio']:.2f}× | {r['flop_bound']:.2f}× | "
            f"{100 * r['excess_over_bound']:+.0f}% | "
            f"{'yes' if r['within_target'] else '**NO**'} | "
            f"{r.get('ratio_same_mode', r['step_ratio']):.2f}× | {vs_eager} | {memory} |")
    summary = cost_summary(rows)
    lines += ["", "Targets: torch.compile within 10% of the FLOP bound at every width — " +
              _verdict(summary["compiled_within_10pct_of_bound"], summary["misses_bound"]) +
              "; eager ≤ 1.15× at width 8 (MLP-512, BERT-mini) — " +
              _verdict(summary["eager_within_1_15"], summary["misses_eager_target"]) +
              "; compiled extended step not slower than eager — " +
              _verdict(summary["compiled_not_slower_than_eager"],
                       summary["compiled_slower_than_eager"]) + "."]
    floors = [r for r in rows if r.get("floor_ratio") is not None]
    if floors:
        lines += ["", "The branch's floor (every branch reduced to its two products "
                  "`B (A x)`, no ρ, bias or α, same graph, same mode): " + "; ".join(
                      f"{r['model']} {r['width']}{' compiled' if r['mode'] == 'compile' else ''}"
                      f" {r['floor_ratio']:.2f}× (extended {r['step_ratio']:.2f}×)"
                      for r in floors) + "."]
    return "\n".join(lines)


def format_compile_counts(counts: dict) -> str:
    phases = ", ".join(f"{k} {v}" for k, v in counts["compilations_by_phase"].items())
    return (f"Dynamo compilations during one Bypass cycle under `compile=True` (by phase the "
            f"step started in): {phases}; {counts['extensions']} extension(s), "
            f"{counts['recompiles']} guard recompilation(s) — target (≤ 1 per extension, 0 "
            f"while returning) {'**met**' if counts['target_met'] else '**not met**'}.")
