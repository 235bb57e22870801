"""What a bypass costs per training step, against the arithmetic bound.

A width-k branch on an n→n linear adds 2kn multiply-adds to n², so width n/8 on every site costs
at least 1.25×. We measure the step-time ratio extended/original side by side (interleaved
repeats, same process), eager and under torch.compile, and report it beside that FLOP ratio.
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

import morphc
from morphc.inspection import branch_macs, site_macs
from morphc.zoo import ConvBN, transformer

WIDTHS = {"1/16": 1 / 16, "1/8": 1 / 8, "1/4": 1 / 4}


def cost_models(quick: bool) -> dict:
    """Models big enough that their linear algebra, not Python overhead, dominates a step."""
    scale = 4 if quick else 1
    n = 512 // scale
    return {
        "mlp": lambda: (nn.Sequential(nn.Linear(n, n), nn.ReLU(), nn.Linear(n, n), nn.ReLU(),
                                      nn.Linear(n, n)), (torch.randn(256 // scale, n),)),
        "cnn_bn": lambda: (ConvBN(channels=32 // scale), (torch.randn(16, 3, 32, 32),)),
        "transformer": lambda: transformer(d_model=128 // scale, heads=4, layers=2,
                                           batch=8, seq=64 // scale),
    }


def flop_ratio(ext) -> float:
    """(site + branch multiply-adds) / site multiply-adds over all extended sites' uses."""
    batch = ext.traced.example_inputs[0].shape[0]
    base = extra = 0
    for site in ext.site_table.extendable():
        for use in site.uses:
            shape = tuple(batch if d == -1 else d for d in use.output_shape)
            base += site_macs(site, shape)
            if site.name in ext.branches:
                extra += branch_macs(site, ext.branches[site.name].width, shape)
    return (base + extra) / base


def _step_fn(module: nn.Module, inputs: tuple, compiled: bool):
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=1e-4)
    forward = torch.compile(module) if compiled else module

    def step():
        opt.zero_grad(set_to_none=True)
        out = forward(*inputs)
        F.mse_loss(out, torch.zeros_like(out)).backward()
        opt.step()
    return step


def _median_times(steps: dict, repeats: int, inner: int) -> dict:
    """Interleave the candidates so machine noise hits them alike; median per candidate."""
    samples = {k: [] for k in steps}
    for _ in range(repeats):
        for key, step in steps.items():
            start = time.perf_counter()
            for _ in range(inner):
                step()
            samples[key].append((time.perf_counter() - start) / inner)
    return {k: statistics.median(v) for k, v in samples.items()}


def measure_step_cost(model_name: str, make, compiled: bool, quick: bool) -> list[dict]:
    torch.manual_seed(0)
    model, inputs = make()
    widths = {"1/8": WIDTHS["1/8"]} if quick else WIDTHS   # quick: a smoke test, one width
    exts = {label: morphc.extend(model, inputs, sites="all", width=w, seed=0)
            for label, w in widths.items()}
    steps = {"original": _step_fn(model, inputs, compiled)}
    steps.update({label: _step_fn(ext, inputs, compiled) for label, ext in exts.items()})
    for step in steps.values():   # warm-up, including compilation
        step()
        step()
    times = _median_times(steps, repeats=3 if quick else 7, inner=2 if quick else 5)
    return [{
        "model": model_name, "mode": "compile" if compiled else "eager", "width": label,
        "step_ms": times[label] * 1e3, "original_step_ms": times["original"] * 1e3,
        "step_ratio": times[label] / times["original"], "flop_ratio": flop_ratio(ext),
        "within_10pct_of_bound": times[label] / times["original"] <= 1.1 * flop_ratio(ext),
    } for label, ext in exts.items()]


def run_step_costs(quick: bool = False, compiled_modes=(False, True), progress=None) -> list:
    rows = []
    for name, make in cost_models(quick).items():
        for compiled in compiled_modes:
            rows += measure_step_cost(name, make, compiled, quick)
            if progress is not None:
                progress.update(1)
    return rows


def format_step_costs(rows: list[dict]) -> str:
    lines = ["| model | mode | width | step ms (orig → ext) | measured ratio | FLOP bound | "
             "within 10% of bound |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['mode']} | {r['width']} | {r['original_step_ms']:.2f} → "
            f"{r['step_ms']:.2f} | {r['step_ratio']:.2f}× | {r['flop_ratio']:.2f}× | "
            f"{'yes' if r['within_10pct_of_bound'] else 'NO'} |")
    return "\n".join(lines)
