"""A cycle in flight as checkpoint data, and back: what ``Bypass.state_dict`` stores mid-cycle."""

from __future__ import annotations

import torch
from torch import nn

from morphc.compiler.extend import extend
from morphc.runtime.config import BypassConfig
from morphc.runtime.cycle import Cycle
from morphc.runtime.optimizer_group import ExtensionGroup
from morphc.runtime.snapshot import Snapshot
from morphc.runtime.user_attributes import reads_user_model


def extension_state(cycle: Cycle | None) -> dict | None:
    """Sites, widths, families, branch values, their optimizer state, the snapshot a rollback
    restores and the cycle's schedule — tensors, numbers, lists and dicts only (None outside a
    cycle)."""
    if cycle is None:
        return None
    cfg, named = cycle.ext.extension_config, dict(cycle.ext.named_extension_parameters())
    return {"sites": list(cfg.sites), "widths": dict(cfg.widths),
            "families": dict(cfg.families), "seed": cfg.seed,
            "init_scale": cfg.init_scale, "scores": cfg.escape_scores,
            "homotopy": cycle.ext.homotopy, "cycle": cycle.state_dict(),
            "params": {n: p.detach().clone() for n, p in named.items()},
            "optimizer": cycle.group.state_dict({p: n for n, p in named.items()}),
            "snapshot": cycle.snapshot.state_dict(),
            "shadow": None if cycle.shadow is None else cycle.shadow.state_dict()}


def restore_cycle(state: dict, *, model: nn.Module, example_inputs, traced,
                  optimizer: torch.optim.Optimizer, config: BypassConfig) -> Cycle:
    """Rebuild the extension of a checkpoint on ``model``: same sites, widths, families and
    values, its optimizer group and the cycle's schedule."""
    wanted = set(state["sites"])
    overrides = {n: {"width": state["widths"][n], "activation": state["families"][n]}
                 for n in state["sites"]}
    ext = reads_user_model(extend(model, example_inputs, sites=lambda s: s.name in wanted,
                                  overrides=overrides, seed=int(state["seed"]),
                                  init_scale=float(state["init_scale"]), traced=traced))
    with torch.no_grad():
        for name, param in ext.named_extension_parameters():
            param.copy_(state["params"][name])
    ext.set_homotopy(state["homotopy"])
    ext.extension_config.escape_scores = state["scores"]
    group = ExtensionGroup(optimizer, list(ext.extension_parameters()), config.extension_options)
    group.load_state_dict(state["optimizer"], dict(ext.named_extension_parameters()))
    cycle = Cycle(ext, Snapshot.from_state(state["snapshot"]), group, config, started_at=0)
    cycle.load_state_dict(state["cycle"])
    return cycle
