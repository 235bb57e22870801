"""The measures of one training step: its FLOPs (the arithmetic bound), its time and its peak
memory, each taken so that the numbers mean what :mod:`morphc.bench.step_cost` says they do."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils import flop_counter

from morphc.ir.kinds import branch_macs, site_macs

# --- the bound -------------------------------------------------------------------------------


def site_mac_ratio(ext) -> float:
    """Forward multiply-adds of the extended sites with their branches over the sites alone."""
    batch = ext.extension_traced.example_inputs[0].shape[0]
    base = extra = 0
    for site in ext.site_table.extendable():
        for use in site.uses:
            shape = tuple(batch if d == -1 else d for d in use.output_shape)
            base += site_macs(site, shape)
            if site.name in ext.extension_branches:
                extra += branch_macs(site, ext.extension_branches[site.name].width, shape)
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


# --- timing and memory -----------------------------------------------------------------------


def training_step(module: nn.Module, inputs: tuple, compiled: bool) -> Callable[[], None]:
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-4)
    forward = torch.compile(module) if compiled else module

    def step():
        opt.zero_grad(set_to_none=True)
        out = forward(*inputs)
        F.mse_loss(out, torch.zeros_like(out)).backward()
        opt.step()
    return step


def step_clock(device: torch.device) -> Callable[[], float]:
    """CPU: the calling thread's CPU time (other processes do not count); CUDA: synchronised
    wall time."""
    if device.type == "cuda":
        def wall() -> float:
            torch.cuda.synchronize(device)
            return time.perf_counter()
        return wall
    return time.thread_time


def interleaved_medians(steps: dict, repeats: int, inner: int,
                        clock: Callable[[], float] = time.perf_counter) -> dict:
    """Seconds per step, median over ``repeats``; each repeat runs every candidate in turn."""
    samples = {k: [] for k in steps}
    for _ in range(repeats):
        for key, step in steps.items():
            start = clock()
            for _ in range(inner):
                step()
            samples[key].append((clock() - start) / inner)
    return {k: statistics.median(v) for k, v in samples.items()}


def peak_step_bytes(step: Callable[[], None], device: torch.device) -> int:
    """Peak bytes allocated during one ``step`` above what was live before it (CUDA: the
    allocator's peak counter; CPU: the profiler's allocation/free events, running sum)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile, record_function

    # two steps: the second frees what the first allocated, inside the profile, so every free
    # it makes is reported (frees of blocks allocated before profiling are not)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
        with record_function("morphc_measured_step"):
            step()
    events = prof.profiler.kineto_results.events()
    mark = next(e for e in events if e.name() == "morphc_measured_step")
    start, end = mark.start_ns(), mark.start_ns() + mark.duration_ns()
    memory = sorted((e for e in events
                     if e.name() == "[memory]" and e.device_type() == DeviceType.CPU),
                    key=lambda e: e.start_ns())
    live, at_start, peak = 0, None, 0
    for event in memory:
        if event.start_ns() >= start and at_start is None:
            at_start = peak = live
        live += event.nbytes()
        if start <= event.start_ns() <= end:
            peak = max(peak, live)
    return peak - (at_start if at_start is not None else live)


def compiled_frames() -> int:
    from torch._dynamo.utils import counters

    return int(counters["frames"]["total"])
