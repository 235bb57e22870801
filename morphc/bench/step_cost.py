"""What a bypass costs per training step, against the arithmetic bound.

For each model and width (a fraction of every site's output size, every site extended), one
training step (zero_grad, forward, MSE backward, SGD step) of the extended graph is timed against
the original, eager and under ``torch.compile``, and reported beside the **FLOP bound**: the ratio
of the matmul/conv FLOPs of a whole step (forward *and* backward, attention included), counted by
``torch.utils.flop_counter.FlopCounterMode`` on the same step. A step whose time scales with its
arithmetic cannot be cheaper than that ratio; the target is to come within 10% of it under
``torch.compile``. (The forward-only site ratio ``1 + k·(fan_in + fan_out)/(fan_in·fan_out)``
of :func:`site_mac_ratio` is reported too; the backward of a branch can cost relatively more
than its forward, e.g. at a first layer whose input needs no gradient.)

How it is measured, so that the numbers mean what they say:

- **like for like**: when the extension is built on a ``torch.export`` graph (a
  ``TransformerEncoder``), the original is timed twice — the user's module and that graph — and
  the ratio is taken against the *faster* of the two, so a slow frontend never flatters the
  extension (an ``fx.symbolic_trace`` graph runs the user's own modules: timed once). Extended
  graphs are compiled as ``morphc.Bypass(compile=True)`` compiles them (``ext.graph_module``);
- **warm-up excluded**: every candidate runs ``warmup`` steps first (compilation of the forward
  and backward graphs happens there); recompilations during timing are counted and reported;
- **interleaved**: all candidates of a model (both modes, all widths) take turns within each
  repeat, so machine noise hits them alike; the median over repeats is kept;
- **threads**: one intra-op thread by default (a shared 2-core machine gives a second thread
  no stable core); the count is recorded with the numbers.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils import flop_counter

import morphc
from morphc.ir.kinds import branch_macs, site_macs
from morphc.zoo import ConvBN, transformer

WIDTHS = {"1/16": 1 / 16, "1/8": 1 / 8, "1/4": 1 / 4}
MODES = ("eager", "compile")
TOLERANCE = 0.10          # the target: measured ratio ≤ (1 + TOLERANCE) × FLOP bound
ModelFactory = Callable[[], tuple[nn.Module, tuple]]


def cost_models(quick: bool) -> dict[str, ModelFactory]:
    """Models whose linear algebra, not Python overhead, dominates a step (quick: 4× smaller)."""
    scale = 4 if quick else 1
    n = 512 // scale
    return {
        "mlp": lambda: (nn.Sequential(nn.Linear(n, n), nn.ReLU(), nn.Linear(n, n), nn.ReLU(),
                                      nn.Linear(n, n)), (torch.randn(256 // scale, n),)),
        "cnn_bn": lambda: (ConvBN(channels=32 // scale), (torch.randn(32 // scale, 3, 32, 32),)),
        "transformer": lambda: transformer(d_model=128 // scale, heads=4, layers=2,
                                           batch=8, seq=64 // scale),
    }


MODEL_LABELS = {"mlp": "MLP 3×Linear(512), batch 256",
                "cnn_bn": "CNN: 2 conv + BatchNorm (32/64 ch), 32×32, batch 32",
                "transformer": "TransformerEncoder d 128, 4 heads, 2 layers, batch 8 × 64"}


# --- the bound -------------------------------------------------------------------------------


def site_mac_ratio(ext) -> float:
    """Forward multiply-adds of the extended sites with their branches over the sites alone."""
    batch = ext.traced.example_inputs[0].shape[0]
    base = extra = 0
    for site in ext.site_table.extendable():
        for use in site.uses:
            shape = tuple(batch if d == -1 else d for d in use.output_shape)
            base += site_macs(site, shape)
            if site.name in ext.branches:
                extra += branch_macs(site, ext.branches[site.name].width, shape)
    return (base + extra) / base


def _cpu_sdpa_formulas() -> dict:
    """FlopCounterMode counts CUDA attention kernels only; add the CPU flash kernel's formulas."""
    aten = torch.ops.aten

    def forward(query, key, value, *args, out_shape=None, **kwargs) -> int:
        return flop_counter.sdpa_flop_count(query, key, value)

    def backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
        return flop_counter.sdpa_backward_flop_count(grad_out, query, key, value)

    ops = {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        ops[aten._scaled_dot_product_flash_attention_for_cpu] = forward
        ops[aten._scaled_dot_product_flash_attention_for_cpu_backward] = backward
    return ops


def step_flops(module: nn.Module, inputs: tuple) -> int:
    """Matmul/conv/attention FLOPs of one forward + backward of ``module`` (MSE to zero)."""
    with flop_counter.FlopCounterMode(display=False, custom_mapping=_cpu_sdpa_formulas()) as fc:
        out = module(*inputs)
        F.mse_loss(out, torch.zeros_like(out)).backward()
    module.zero_grad(set_to_none=True)
    return fc.get_total_flops()


# --- timing ----------------------------------------------------------------------------------


def _step_fn(module: nn.Module, inputs: tuple, compiled: bool) -> Callable[[], None]:
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=1e-4)
    forward = torch.compile(module) if compiled else module

    def step():
        opt.zero_grad(set_to_none=True)
        out = forward(*inputs)
        F.mse_loss(out, torch.zeros_like(out)).backward()
        opt.step()
    return step


def interleaved_medians(steps: dict, repeats: int, inner: int) -> dict:
    """Seconds per step, median over ``repeats``; each repeat runs every candidate in turn."""
    samples = {k: [] for k in steps}
    for _ in range(repeats):
        for key, step in steps.items():
            start = time.perf_counter()
            for _ in range(inner):
                step()
            samples[key].append((time.perf_counter() - start) / inner)
    return {k: statistics.median(v) for k, v in samples.items()}


def _compiled_frames() -> int:
    from torch._dynamo.utils import counters

    return int(counters["frames"]["total"])


def measure_model(name: str, make: ModelFactory, widths: dict, modes=MODES, *, warmup: int = 3,
                  repeats: int = 7, inner: int = 5) -> list[dict]:
    """One row per (mode, width): measured step-time ratio beside the FLOP bound."""
    torch.manual_seed(0)
    model, inputs = make()
    exts = {label: morphc.extend(model, inputs, sites="all", width=w, seed=0)
            for label, w in widths.items()}
    traced = next(iter(exts.values())).traced
    flops = {"original": step_flops(model, inputs)}
    flops.update({label: step_flops(ext, inputs) for label, ext in exts.items()})
    candidates = {}
    for mode in modes:
        compiled = mode == "compile"
        candidates[(mode, "user")] = _step_fn(model, inputs, compiled)
        if traced.frontend != "symbolic_trace":   # an fx trace runs the user's own modules
            candidates[(mode, "graph")] = _step_fn(traced.graph_module, inputs, compiled)
        candidates.update({(mode, label): _step_fn(ext.graph_module, inputs, compiled)
                           for label, ext in exts.items()})
    for step in candidates.values():   # compilation of forward and backward happens here
        for _ in range(warmup):
            step()
    frames = _compiled_frames()
    times = interleaved_medians(candidates, repeats, inner)
    recompiles = _compiled_frames() - frames
    fastest = min(t for (_, kind), t in times.items() if kind in ("user", "graph"))
    rows = []
    for mode in modes:
        graph_s = times.get((mode, "graph"), times[(mode, "user")])
        original = min(times[(mode, "user")], graph_s)
        for label, ext in exts.items():
            ratio, bound = times[(mode, label)] / original, flops[label] / flops["original"]
            rows.append({
                "model": name, "mode": mode, "width": label,
                "branch_widths": sorted(set(ext.config.widths.values())),
                "step_ms": times[(mode, label)] * 1e3, "original_ms": original * 1e3,
                "original_user_ms": times[(mode, "user")] * 1e3,
                "original_graph_ms": graph_s * 1e3, "frontend": traced.frontend,
                "step_ratio": ratio, "flop_bound": bound, "site_mac_ratio": site_mac_ratio(ext),
                "excess_over_bound": ratio / bound - 1,
                "ratio_vs_fastest_original": times[(mode, label)] / fastest,
                "within_target": ratio <= (1 + TOLERANCE) * bound,
                "eager_step_ms": times[("eager", label)] * 1e3 if "eager" in modes else None,
                "compiled_not_slower_than_eager": (times[(mode, label)] <= times[("eager", label)]
                                                   if mode == "compile" and "eager" in modes
                                                   else None),
                "recompiles_during_timing": recompiles,
            })
    return rows


QUICK_COMPILED = ("mlp",)   # a cold torch.compile costs ~10 s per graph on 2 CPU cores


def run_step_costs(quick: bool = False, modes=MODES, progress=None,
                   threads: int | None = 1) -> list[dict]:
    """Every model × mode × width. Quick (a smoke test): small models, width 1/8 only, fewer
    repeats, and torch.compile for the MLP only."""
    widths = {"1/8": WIDTHS["1/8"]} if quick else WIDTHS
    old = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    rows = []
    try:
        for name, make in cost_models(quick).items():
            model_modes = modes if not quick or name in QUICK_COMPILED else \
                tuple(m for m in modes if m != "compile")
            for row in measure_model(name, make, widths, model_modes, warmup=2 if quick else 3,
                                     repeats=3 if quick else 7, inner=2 if quick else 5):
                rows.append({**row, "threads": torch.get_num_threads()})
            if progress is not None:
                progress.update(1)
    finally:
        torch.set_num_threads(old)
    return rows


def cost_summary(rows: list[dict]) -> dict:
    """The two targets, met or not, with the rows that miss them."""
    compiled = [r for r in rows if r["mode"] == "compile"]
    miss_bound = [f"{r['model']} {r['width']}" for r in compiled if not r["within_target"]]
    slower = [f"{r['model']} {r['width']}" for r in compiled
              if r["compiled_not_slower_than_eager"] is False]
    return {"compiled_within_10pct_of_bound": not miss_bound and bool(compiled),
            "misses_bound": miss_bound,
            "compiled_not_slower_than_eager": not slower and bool(compiled),
            "compiled_slower_than_eager": slower}


def format_step_costs(rows: list[dict]) -> str:
    lines = ["| model | width | mode | original ms (user module / export graph) | extended ms | "
             "measured ratio | FLOP bound | over bound | within 10% | compiled / eager "
             "(extended) | vs fastest original, any mode |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        not_slower = r["compiled_not_slower_than_eager"]
        original = f"{r['original_user_ms']:.2f}" + (
            "" if r["frontend"] == "symbolic_trace" else f" / {r['original_graph_ms']:.2f}")
        vs_eager = "" if not_slower is None else \
            f"{r['step_ms'] / r['eager_step_ms']:.2f}×" + ("" if not_slower else " **slower**")
        lines.append(
            f"| {r['model']} | {r['width']} | {r['mode']} | {original} | "
            f"{r['step_ms']:.2f} | {r['step_ratio']:.2f}× | "
            f"{r['flop_bound']:.2f}× | {100 * r['excess_over_bound']:+.0f}% | "
            f"{'yes' if r['within_target'] else '**NO**'} | {vs_eager} | "
            f"{r['ratio_vs_fastest_original']:.2f}× |")
    summary = cost_summary(rows)
    lines += ["", "Targets (torch.compile): measured ratio within 10% of the FLOP bound at every "
              "width — " + ("**met**" if summary["compiled_within_10pct_of_bound"] else
                            "**not met** (" + ", ".join(summary["misses_bound"]) + ")") +
              "; compiled extended step not slower than eager — " +
              ("**met**" if summary["compiled_not_slower_than_eager"] else
               "**not met** (" + ", ".join(summary["compiled_slower_than_eager"]) + ")") + "."]
    return "\n".join(lines)
