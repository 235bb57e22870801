"""Pass times: how long extend and contract take on big real-shaped models, tracing apart.

The target is that the passes themselves — ``extend`` (find sites, insert branches) and
``contract`` (fold, with its default verification forward) — stay under a second on a
ResNet-50-shaped net and a 12-layer transformer encoder, and that the sympy derivation is paid
once per family, not per extend. Tracing is timed apart: it is paid once per model
(``morphc.trace``, then ``extend(..., traced=...)``), and ``torch.export`` is the slow part.
With transformers installed, four tiny Hugging Face models of the zoo (keyword inputs, export
frontend) are timed too; ``morphc.bench.zoo_times`` times the whole zoo, once per model.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

import morphc
from morphc import zoo
from morphc.bench import hf_zoo
from morphc.families import derivation_count

MODELS: dict[str, Callable] = {"resnet50": zoo.resnet50, "transformer12": zoo.transformer12}
TARGET_S = 1.0


HF_MODELS = {"hf-bert": "bert", "hf-gpt2": "gpt2", "hf-llama": "llama", "hf-vit": "vit"}


def hf_models() -> dict[str, Callable]:
    """Four tiny Hugging Face models of the zoo (``morphc.bench.hf_zoo``: configs, random weights,
    no download), when transformers is installed (``pip install morphc[hf]``): each factory
    returns ``(model, args, kwargs)``. The whole zoo, once per model, is ``zoo_times``."""
    if not hf_zoo.available():
        return {}
    return {label: hf_zoo.ZOO[name].build for label, name in HF_MODELS.items()}


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def time_passes(name: str, width: float = 0.125, activation: str = "tanh",
                repeats: int = 5, quick: bool = False) -> dict:
    """Seconds for each stage on model ``name`` (one of ``MODELS``), plus derivation counts.

    extend/contract run ``repeats`` times; the first run (cold caches) and the median of the
    rest are both reported. ``contract`` is timed as users call it (``verify=True``: one forward
    of the extended and one of the folded graph to check C1) and without verification.
    """
    torch.manual_seed(0)
    built = {**MODELS, **hf_models()}[name]()
    model, inputs, kwargs = built if len(built) == 3 else (*built, None)
    repeats = 2 if quick else repeats
    params = sum(p.numel() for p in model.parameters())
    traced, trace_s = _timed(lambda: morphc.trace(model, inputs, kwargs=kwargs, cache=False))
    extend_s, contract_s, bare_s, derivations = [], [], [], []
    for i in range(repeats):
        before = derivation_count()
        ext, seconds = _timed(lambda: morphc.extend(model, inputs, sites="all", width=width,
                                                    activation=activation, traced=traced))
        derivations.append(derivation_count() - before)
        extend_s.append(seconds)
        ext.set_homotopy(0.0)
        verify = i % 2 == 0           # alternate, so both kinds see the same machine state
        (contract_s if verify else bare_s).append(
            _timed(lambda e=ext, v=verify: morphc.contract(e, verify=v))[1])
    steady = statistics.median(extend_s[1:] or extend_s)
    contract_steady = statistics.median(contract_s[1:] or contract_s)
    return {
        "model": name, "parameters": params, "sites": len(ext.extension_sites),
        "frontend": traced.frontend, "trace_s": trace_s,
        "extend_first_s": extend_s[0], "extend_s": steady,
        "contract_first_s": contract_s[0], "contract_s": contract_steady,
        "contract_without_verification_s": statistics.median(bare_s) if bare_s else None,
        "passes_s": steady + contract_steady, "within_target": steady + contract_steady < TARGET_S,
        "derivations_per_extend": derivations,
    }


def format_pass_times(rows: list[dict]) -> str:
    lines = ["| model | params | sites | frontend | trace s (once per model) | extend s (first) "
             "| contract s (first) | contract without verification s | extend + contract "
             "< 1 s | sympy derivations per extend |", "|" + "---|" * 10]
    for r in rows:
        bare = r["contract_without_verification_s"]
        lines.append(
            f"| {r['model']} | {r['parameters']:,} | {r['sites']} | {r['frontend']} | "
            f"{r['trace_s']:.2f} | {r['extend_s']:.3f} ({r['extend_first_s']:.3f}) | "
            f"{r['contract_s']:.3f} ({r['contract_first_s']:.3f}) | "
            f"{'—' if bare is None else f'{bare:.3f}'} | "
            f"{'yes' if r['within_target'] else '**NO**'} ({r['passes_s']:.2f} s) | "
            f"{r['derivations_per_extend']} |")
    return "\n".join(lines)
