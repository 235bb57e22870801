"""Bypass with the library defaults on problems the rest of the bench does not tune for.

The bench's own problems chose Bypass's defaults; these did not. Each is what a user would try
first — a textbook network, a stock optimizer and schedule, ``morphc.Bypass(model, optimizer)``
with nothing set, ``finish()`` at the end — and is scored against the same training without
Bypass, same seed, same steps. The question is the issue's: is anyone left worse off?

    python -m morphc.bench.unseen --seeds 8              # all problems, ~10 min on one core
    python -m morphc.bench.unseen --seeds 3 sine_deep    # some of them

A seed counts as *worse* (*better*) when Bypass's final full-training loss is above (below)
plain training's by more than 2 % of its size.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import morphc
from morphc.bench.unseen_problems import PROBLEMS, Case


@dataclass
class Outcome:
    train_loss: float
    test_score: float | None    # accuracy for classifiers, MSE for regressions
    seconds: float
    cycles: tuple[int, int]     # (started, kept)


def run(problem: str, seed: int, bypass: bool) -> Outcome:
    """Train one case, with or without ``morphc.Bypass`` (library defaults), and score it.
    Dropout draws from the global RNG: both runs of a seed start it from the same state (and
    the caller's state is restored), so they differ only by what Bypass does."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _train(PROBLEMS[problem](seed), seed, bypass)


def _train(case: Case, seed: int, bypass: bool) -> Outcome:
    model, (x, y) = case.model, case.train
    optimizer = case.optimizer(model.parameters())
    scheduler = case.schedule(optimizer) if case.schedule else None
    bp = morphc.Bypass(model, optimizer, verbose=False) if bypass else None
    batches = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for _ in range(case.steps):
        if case.batch is None:
            xb, yb = x, y
        else:
            pick = torch.randint(0, len(x), (case.batch,), generator=batches)
            xb, yb = x[pick], y[pick]

        def closure(module, xb=xb, yb=yb):
            return case.loss_fn(module(xb), yb)

        if bp is not None:
            bp.step(closure)
        else:
            optimizer.zero_grad()
            closure(model).backward()
            optimizer.step()
        if scheduler is not None:
            scheduler.step()
    if bp is not None:
        model = bp.finish()
    seconds = time.perf_counter() - start
    model.eval()
    with torch.no_grad():
        train_loss = float(case.loss_fn(model(x), y))
        score = None if case.test is None else _score(model(case.test[0]), case)
    cycles = (0, 0) if bp is None else (
        sum(e["event"] == "extend" for e in bp.history),
        sum(e["event"] == "contract" for e in bp.history))
    return Outcome(train_loss, score, seconds, cycles)


def _score(out: torch.Tensor, case: Case) -> float:
    target = case.test[1]
    if target.dtype == torch.long:
        return float((out.argmax(1) == target).float().mean())
    if case.loss_fn is F.binary_cross_entropy_with_logits:
        return float(((out > 0).float() == target).float().mean())
    return float(F.mse_loss(out, target))


_TOLERANCE = 0.02   # relative to |plain|: a negative log-likelihood can be below 0


def verdicts(plain: Sequence[float], bypass: Sequence[float]) -> tuple[int, int]:
    """(seeds worse, seeds better): Bypass's loss off plain's by more than 2 % of its size."""
    pairs = list(zip(plain, bypass, strict=True))
    margin = [_TOLERANCE * abs(p) + 1e-6 for p, _ in pairs]
    return (sum(b - p > m for (p, b), m in zip(pairs, margin, strict=True)),
            sum(p - b > m for (p, b), m in zip(pairs, margin, strict=True)))


def compare(problem: str, seeds: Sequence[int], threads: int = 1) -> dict:
    """Plain and Bypass on the same seeds: medians, per-seed pairs, worse/better counts. One
    intra-op thread by default, as in the rest of the bench: these models are tiny, and a
    second thread only waits (on a busy 2-core machine it made a run 3× slower)."""
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        pairs = [(run(problem, s, False), run(problem, s, True)) for s in seeds]
    finally:
        torch.set_num_threads(old_threads)
    plain = [p.train_loss for p, _ in pairs]
    bypass = [b.train_loss for _, b in pairs]
    return {
        "problem": problem,
        "plain": statistics.median(plain), "bypass": statistics.median(bypass),
        **dict(zip(("worse", "better"), verdicts(plain, bypass), strict=True)),
        "seeds": len(pairs), "pairs": list(zip(plain, bypass, strict=True)),
        "wall": statistics.median(b.seconds / p.seconds for p, b in pairs),
        "cycles": tuple(sum(b.cycles[i] for _, b in pairs) for i in (0, 1)),
        "test": None if pairs[0][0].test_score is None else
        (statistics.median(p.test_score for p, _ in pairs),
         statistics.median(b.test_score for _, b in pairs)),
    }


def format_row(r: dict) -> str:
    test = "—" if r["test"] is None else f"{r['test'][0]:.4g} / {r['test'][1]:.4g}"
    return (f"| `{r['problem']}` | {r['plain']:.4g} | {r['bypass']:.4g} | {r['worse']} / "
            f"{r['better']} of {r['seeds']} | {test} | {r['cycles'][0]} / {r['cycles'][1]} | "
            f"{r['wall']:.2f} |")


HEADER = ("| problem | plain (median train loss) | Bypass | seeds worse / better | "
          "test plain / Bypass | cycles started / kept | wall × plain |\n"
          "|---|---|---|---|---|---|---|")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("problems", nargs="*", help=f"some of {', '.join(PROBLEMS)} "
                        "(default: all)")
    parser.add_argument("--seeds", type=int, default=8)
    args = parser.parse_args(argv)
    unknown = [name for name in args.problems if name not in PROBLEMS]
    if unknown:
        parser.error(f"unknown problems {unknown}; choose from {list(PROBLEMS)}")
    print(HEADER, flush=True)
    for name in args.problems or PROBLEMS:
        print(format_row(compare(name, range(args.seeds))), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
