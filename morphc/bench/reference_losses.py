"""Reference losses: the best training loss an architecture reaches on a seed's data.

They are costly (many restarts), so they are cached in ``reference_losses.json`` beside this file,
shipped with the package and extended by any run that had to compute a missing seed.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from morphc.bench.problem_families import narrow_data, narrow_student

REFERENCE_RESTARTS, REFERENCE_STEPS = 10, 4000


def width_best_loss(seed: int, restarts: int = REFERENCE_RESTARTS,
                    steps: int = REFERENCE_STEPS) -> float:
    """The best training loss a width-4 student reaches on seed's data: the best of ``restarts``
    random inits, each trained ``steps`` full-batch Adam steps with a cosine decay (lr 1e-2 →
    1e-4). An estimate from above of the width's optimum; cached (see :func:`reference_loss`)."""
    data = narrow_data(seed)
    best = math.inf
    for r in range(restarts):
        model = narrow_student(seed, init_seed=100_000 + 1000 * seed + r)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps, eta_min=1e-4)
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            F.mse_loss(model(data.x_train), data.y_train).backward()
            opt.step()
            sched.step()
        with torch.no_grad():
            best = min(best, F.mse_loss(model(data.x_train), data.y_train).item())
    return best


_REFERENCE_FILE = Path(__file__).with_name("reference_losses.json")


def reference_loss(problem: str, seed: int, compute: Callable[[int], float]) -> float:
    """A problem's reference loss for a seed, from ``reference_losses.json`` beside this file
    (shipped, and extended by any run that had to compute a missing seed)."""
    key = f"{problem}/{seed}"
    try:
        table = json.loads(_REFERENCE_FILE.read_text())
    except (OSError, ValueError):
        table = {}
    if key not in table:
        table[key] = compute(seed)
        try:
            _REFERENCE_FILE.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
        except OSError:
            pass
    return float(table[key])
