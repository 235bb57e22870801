"""Pass times: how long extend and contract take on big real-shaped models, tracing apart.

The target is that the passes themselves (find sites, insert branches, fold) stay under a second
on a ResNet-50-shaped net and a 12-layer transformer encoder, and that the sympy derivation is
paid once per family, not per extend.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

import morphc
from morphc import zoo
from morphc.families import derivation_count

MODELS: dict[str, Callable] = {"resnet50": zoo.resnet50, "transformer12": zoo.transformer12}


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def time_passes(name: str, width: float = 0.125, activation: str = "tanh",
                repeats: int = 3, quick: bool = False) -> dict:
    """Seconds for each stage on model ``name`` (one of ``MODELS``), plus derivation counts.

    extend/contract run ``repeats`` times; the first run (cold allocator) and the median of the
    rest are both reported.
    """
    torch.manual_seed(0)
    model, inputs = MODELS[name]()
    repeats = 2 if quick else repeats
    params = sum(p.numel() for p in model.parameters())
    traced, trace_s = _timed(lambda: morphc.trace(model, inputs))
    extend_s, contract_s, derivations = [], [], []
    for _ in range(repeats):
        before = derivation_count()
        ext, seconds = _timed(lambda: morphc.extend(model, inputs, sites="all", width=width,
                                                    activation=activation, traced=traced))
        derivations.append(derivation_count() - before)
        extend_s.append(seconds)
        ext.set_homotopy(0.0)
        contract_s.append(_timed(lambda e=ext: morphc.contract(e, verify=False))[1])
    ext = morphc.extend(model, inputs, sites="all", width=width, activation=activation,
                        traced=traced)
    ext.set_homotopy(0.0)
    verified_s = _timed(lambda: morphc.contract(ext, verify=True))[1]
    steady = (statistics.median(extend_s[1:] or extend_s),
              statistics.median(contract_s[1:] or contract_s))
    return {
        "model": name, "parameters": params, "sites": len(ext.sites),
        "frontend": traced.frontend, "trace_s": trace_s,
        "extend_first_s": extend_s[0], "contract_first_s": contract_s[0],
        "extend_s": steady[0], "contract_s": steady[1],
        "contract_with_verification_s": verified_s, "passes_s": sum(steady),
        "derivations_per_extend": derivations, "deviation": ext.contraction_report.deviation,
    }


def format_pass_times(rows: list[dict]) -> str:
    lines = ["| model | params | sites | frontend | trace s | extend s (first) | "
             "contract s (first) | contract + verify s | passes < 1 s | sympy derivations |",
             "|" + "---|" * 10]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['parameters']:,} | {r['sites']} | {r['frontend']} | "
            f"{r['trace_s']:.2f} | {r['extend_s']:.3f} ({r['extend_first_s']:.3f}) | "
            f"{r['contract_s']:.3f} ({r['contract_first_s']:.3f}) | "
            f"{r['contract_with_verification_s']:.3f} | {'yes' if r['passes_s'] < 1 else 'NO'} | "
            f"{r['derivations_per_extend']} |")
    return "\n".join(lines)
