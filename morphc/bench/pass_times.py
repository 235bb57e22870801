"""Pass times: how long extend and contract take on big real-shaped models, tracing apart.

The target is that the passes themselves — ``extend`` (find sites, insert branches) and
``contract`` (fold, with its default verification forward) — stay under a second on a
ResNet-50-shaped net and a 12-layer transformer encoder, and that the sympy derivation is paid
once per family, not per extend. Tracing is timed apart: it is paid once per model
(``morphc.trace``, then ``extend(..., traced=...)``), and ``torch.export`` is the slow part.
With transformers installed, tiny Hugging Face models (keyword inputs, export frontend) are timed
too.
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
TARGET_S = 1.0


def _hf(make_model, inputs: dict) -> Callable:
    def build():
        model = make_model().eval()
        return model, (), inputs
    return build


def hf_models() -> dict[str, Callable]:
    """Tiny Hugging Face models from configs (random weights, no download), when transformers is
    installed (``pip install morphc[hf]``): each factory returns ``(model, args, kwargs)``."""
    try:
        import transformers as tf
    except ImportError:
        return {}
    g = torch.Generator().manual_seed(0)
    text = {"input_ids": torch.randint(3, 99, (2, 9), generator=g),
            "attention_mask": torch.ones(2, 9, dtype=torch.long)}
    small = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=37, max_position_embeddings=64)
    return {
        "hf-bert": _hf(lambda: tf.BertModel(tf.BertConfig(**small)), text),
        "hf-gpt2": _hf(lambda: tf.GPT2LMHeadModel(tf.GPT2Config(
            vocab_size=99, n_embd=32, n_layer=2, n_head=4, n_positions=64)),
            {**text, "use_cache": False}),
        "hf-llama": _hf(lambda: tf.LlamaForCausalLM(tf.LlamaConfig(**small, num_key_value_heads=2)),
                        {**text, "use_cache": False}),
        "hf-vit": _hf(lambda: tf.ViTModel(tf.ViTConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
            patch_size=8, image_size=32)),
            {"pixel_values": torch.randn(2, 3, 32, 32, generator=g)}),
    }


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
        "model": name, "parameters": params, "sites": len(ext.sites),
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
