"""Bypass settings on the demo's teacher–student saddle: 5 seeds, 2000 full-batch Adam steps.

Prints one markdown row per setting: the final training loss with Bypass over plain Adam's
(geometric mean over the seeds, worst seed in brackets) and the cycles started and kept. The
results are in examples/README.md. Run: ``python examples/bypass_settings.py`` (~5 min on CPU).
"""

import math

import torch

import morphc
from morphc.bench.problems import PROBLEMS

PROBLEM = PROBLEMS["teacher_student"]
SEEDS, STEPS = range(5), 2000
SETTINGS = {
    "defaults": {},
    'sites="auto"': {"sites": "auto"},
    'sites="auto", probe=None (first-order score)': {"sites": "auto", "probe": None},
    'sites="2"': {"sites": "2"},
    'free_phase="plain"': {"free_phase": "plain"},
    'return_mode="anneal"': {"return_mode": "anneal"},
    'free_phase="plain", return_mode="anneal" (the earlier default)':
        {"free_phase": "plain", "return_mode": "anneal"},
    'return_mode="penalty"': {"return_mode": "penalty"},
    'activation="poly"': {"activation": "poly"},
    "width=4": {"width": 4},
    "width=16": {"width": 16},
    "bypass_steps=50, return_steps=50": {"bypass_steps": 50, "return_steps": 50},
    "extension_lr_scale=0.1 (the earlier default)": {"extension_lr_scale": 0.1},
}


def final_loss(seed: int, settings: dict | None) -> tuple[float, int, int]:
    """(final training loss, cycles started, cycles kept); ``settings`` None is plain Adam."""
    data, model = PROBLEM.make_data(seed), PROBLEM.make_model(seed)
    torch.manual_seed(seed)

    def factory(params):
        return torch.optim.Adam(params, lr=PROBLEM.lr)

    def closure(module):
        return PROBLEM.loss_fn(module(data.x_train), data.y_train)

    started = kept = 0
    if settings is None:
        optimizer = factory(model.parameters())
        for _ in range(STEPS):
            optimizer.zero_grad()
            closure(model).backward()
            optimizer.step()
    else:
        bp = morphc.Bypass(model, factory, seed=seed, verbose=False, total_steps=STEPS,
                           **settings)
        for _ in range(STEPS):
            bp.step(closure)
        model = bp.finish()
        started = sum(e["event"] == "extend" for e in bp.history)
        kept = sum(e["event"] == "contract" for e in bp.history)
    with torch.no_grad():
        return float(closure(model)), started, kept


def main() -> None:
    torch.set_num_threads(1)
    plain = [final_loss(seed, None)[0] for seed in SEEDS]
    print(f"plain Adam final loss: {[round(v, 4) for v in plain]}")
    print("| Bypass settings | ratio (worst) | cycles started / kept per seed |")
    print("|---|---|---|")
    for name, settings in SETTINGS.items():
        runs = [final_loss(seed, settings) for seed in SEEDS]
        ratios = [loss / base for (loss, _, _), base in zip(runs, plain, strict=True)]
        geometric = math.exp(sum(math.log(max(r, 1e-300)) for r in ratios) / len(ratios))
        cycles = ", ".join(f"{s}/{k}" for _, s, k in runs)
        print(f"| {name} | {geometric:.2g} ({max(ratios):.2g}) | {cycles} |", flush=True)


if __name__ == "__main__":
    main()
