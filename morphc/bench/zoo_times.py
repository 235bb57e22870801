"""Pass times on the Hugging Face zoo: per model, trace, extend and contract, tracing apart.

For each entry of :data:`morphc.bench.hf_zoo.ZOO` (tiny configs, random weights, no download):

* **trace** — ``morphc.trace`` as ``extend`` calls it (export or symbolic trace, first call), then
  a second call with the same model and inputs, which must come from the trace cache; and the
  extended model's first forward on the example inputs;
* **extend** — ``morphc.extend(..., traced=...)`` on every site (tracing apart), first call and
  again;
* **another batch / another size** — the extended model called on the entry's ``alt`` inputs
  (another batch size; another sequence length / image side / audio length), checked against the
  model (E1); a size only the exported graph fixed is traced again (``ext.retraces``), a size the
  model itself refuses is refused with a ``ShapeError``;
* **contract** — after perturbing every branch (so folding has something to do), ``morphc
  .contract`` as users call it (with its verification forward); the relative deviation of the
  contracted model from the extended one, the largest over the shapes the model took.

Nothing here asserts a time: the rows are reported. Without ``transformers``, ``zoo_rows``
returns no rows and ``skip_reason()`` says why.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

import torch

import morphc
from morphc.bench import hf_zoo
from morphc.compiler.deviation import relative_deviation

QUICK = ("bert", "resnet")        # `morphc bench --quick`: two small ones, one text, one vision
WIDTH = 3
E1_TOLERANCE = 1e-6


def skip_reason() -> str | None:
    """Why the zoo cannot run here, or ``None`` when it can."""
    if hf_zoo.available():
        return None
    return ("Hugging Face zoo skipped: `transformers` is not installed "
            "(pip install 'morphc[hf]')")


def zoo_names(quick: bool = False) -> list[str]:
    """The zoo entries ``morphc bench`` times: ``QUICK`` under ``--quick``, else all of them."""
    return list(QUICK) if quick else list(hf_zoo.ZOO)


def _first(output) -> torch.Tensor:
    """The model's main output (logits / last_hidden_state): its first tensor leaf."""
    return next(t for t in torch.utils._pytree.tree_leaves(output) if isinstance(t, torch.Tensor))


def _run(module, entry, shape) -> torch.Tensor:
    args, kwargs = entry.inputs(*shape)
    with torch.no_grad():
        return _first(module(*args, **kwargs))


def _timed(fn: Callable):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def _error(exc: BaseException) -> str:
    line = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {line[:120]}"


def _try_shape(model, ext, entry, shape) -> tuple[str, float | None]:
    """What the extended model does on ``shape``: ``"yes"`` (E1 holds), ``"yes, re-traced (s)"``,
    ``"no: model refuses"`` (the eager model fails too, and the extended model says so with a
    ``ShapeError``), or what went wrong; and the seconds of that call when it ran."""
    retraces = len(ext.retraces)
    try:
        eager = _run(model, entry, shape)
    except Exception:  # the model itself refuses this shape: the extended one must, typed
        eager = None
    try:
        extended, seconds = _timed(lambda: _run(ext, entry, shape))
    except morphc.ShapeError as exc:
        return ("no: model refuses" if eager is None else f"**no**: {_error(exc)}"), None
    except Exception as exc:  # reported in the table, not raised: one model does not stop a run
        return f"**no**: {_error(exc)}", None
    if eager is None:
        return "**yes, but the model refuses it**", None
    deviation = relative_deviation(eager, extended)
    if deviation > E1_TOLERANCE:
        return f"**E1 broken** ({deviation:.1e})", None
    if len(ext.retraces) > retraces:
        return f"yes, re-traced ({ext.retraces[-1].seconds:.1f} s)", seconds
    return "yes", seconds


def time_zoo_model(name: str, width: int = WIDTH) -> dict:
    """One row: trace / extend / contract times, sites, exclusions, deviation, other shapes."""
    entry = hf_zoo.ZOO[name]
    model, args, kwargs = entry.build()
    row: dict = {"model": name, "family": entry.family,
                 "parameters": sum(p.numel() for p in model.parameters()), "error": None}
    try:
        traced = morphc.trace(model, args, kwargs=kwargs, dynamic_shapes=entry.dynamic_shapes)
        again, again_s = _timed(lambda: morphc.trace(model, args, kwargs=kwargs,
                                                     dynamic_shapes=entry.dynamic_shapes))
        row.update(frontend=traced.frontend, trace_s=traced.trace_seconds,
                   trace_again_s=again_s, trace_cached=again is traced and again.cached,
                   specialised=[f"{s.input}.size({s.dim})" for s in traced.specialised])
        options = dict(sites="all", width=width, seed=1, traced=traced, **(entry.options or {}))
        first, extend_first_s = _timed(lambda: morphc.extend(model, args, kwargs=kwargs,
                                                             **options))
        ext, extend_s = _timed(lambda: morphc.extend(model, args, kwargs=kwargs, **options))
        del first
        table = ext.site_table
        row.update(extend_first_s=extend_first_s, extend_s=extend_s, sites=len(ext.extension_sites),
                   exclusions=len(table.exclusions) + sum(s.excluded is not None
                                                          for s in table.values()))
        (b0, s0), (b1, s1) = entry.default, entry.alt
        shapes = {"example": (b0, s0), "batch": (b1, s0), "size": (b0, s1)}
        taken = {}
        for label, shape in shapes.items():
            verdict, seconds = _try_shape(model, ext, entry, shape)
            row[label] = verdict
            if label == "example":
                row["first_call_s"] = seconds     # the extended model's first forward
            if verdict.startswith("yes"):
                taken[label] = shape
        row["alt"] = {"batch": b1, "size": s1, "size_kind": entry.size_kind}
        row["retraces"] = len(ext.retraces)
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for branch in ext.extension_branches.values():
                branch.B.copy_(torch.randn(branch.B.shape, generator=generator) * 0.05)
        ext.set_homotopy(0.0)
        expected = {label: _run(ext, entry, shape) for label, shape in taken.items()}
        _, row["contract_s"] = _timed(lambda: morphc.contract(ext))
        row["deviation"] = max((relative_deviation(expected[label], _run(model, entry, shape))
                                for label, shape in taken.items()), default=None)
    except Exception as exc:  # a refusal (typed) or a failure: reported as the row's result
        row["error"] = _error(exc)
    return row


def zoo_rows(names: Iterable[str] | None = None, quick: bool = False) -> list[dict]:
    """Rows for ``names`` (default: ``zoo_names(quick)``); none without transformers."""
    if skip_reason() is not None:
        return []
    return [time_zoo_model(name) for name in (zoo_names(quick) if names is None else names)]


def _s(value: float | None, digits: int = 2) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def format_zoo_times(rows: list[dict]) -> str:
    """One markdown table, a row per model, and a totals line."""
    lines = ["| model | family | params | frontend | trace s | 2nd trace: cached (ms) | "
             "extend s (first) | 1st call s | contract s | sites | excl. | contraction rel. dev. "
             "| another batch | another size |", "|" + "---|" * 14]
    for r in rows:
        if r.get("error") and "extend_s" not in r:
            lines.append(f"| {r['model']} | {r['family']} | {r['parameters']:,} | "
                         f"{r.get('frontend', '—')} | {_s(r.get('trace_s'))} | | | | | | | "
                         f"**refused**: {r['error']} | | |")
            continue
        cached = "yes" if r["trace_cached"] else "**no**"
        dev = r.get("deviation")
        contract = _s(r.get("contract_s"), 3) if not r.get("error") else f"**{r['error']}**"
        lines.append(
            f"| {r['model']} | {r['family']} | {r['parameters']:,} | {r['frontend']} | "
            f"{_s(r['trace_s'])} | {cached} ({1e3 * r['trace_again_s']:.1f}) | "
            f"{_s(r['extend_s'], 3)} ({_s(r['extend_first_s'], 3)}) | "
            f"{_s(r.get('first_call_s'), 3)} | {contract} | "
            f"{r['sites']} | {r['exclusions']} | {'—' if dev is None else f'{dev:.1e}'} | "
            f"{r.get('batch', '—')} | {r.get('size', '—')} |")
    return "\n".join(lines)


def _top(rows: list[dict], seconds: Callable[[dict], float], n: int = 3) -> str:
    return ", ".join(f"{r['model']} {seconds(r):.2f} s"
                     for r in sorted(rows, key=seconds, reverse=True)[:n])


def zoo_summary(rows: list[dict]) -> str:
    """Totals and the slowest models, one paragraph."""
    if not rows:
        return ""
    done = [r for r in rows if "contract_s" in r and not r.get("error")]
    traced = [r for r in rows if r.get("trace_s") is not None]
    trace_total = sum(r["trace_s"] for r in traced)
    extend_total = sum(r["extend_s"] for r in done)
    contract_total = sum(r["contract_s"] for r in done)
    devs = [r["deviation"] for r in done if r.get("deviation") is not None]
    both = sum(r.get("batch", "").startswith("yes") and r.get("size", "").startswith("yes")
               for r in rows)
    refused = [r["model"] for r in rows if "no: model refuses" in (r.get("batch"), r.get("size"))]
    why = (f" ({', '.join(refused)}: the model itself refuses the other shape, and the extended "
           "one says so with a ShapeError)" if refused else "")
    return (f"{len(done)}/{len(rows)} models extended and contracted. Tracing "
            f"{trace_total:.1f} s in all (slowest: {_top(traced, lambda r: r['trace_s'])}); "
            f"extend {extend_total:.2f} s and contract {contract_total:.2f} s in all (slowest "
            f"extend + contract: {_top(done, lambda r: r['extend_s'] + r['contract_s'])}); "
            f"largest contraction deviation {max(devs, default=0.0):.1e}; {both}/{len(rows)} "
            f"take both another batch size and another size{why}.")
