"""Architecture search by function-preserving moves on scikit-learn's digits (no download).

A deliberately small seed MLP (64 → 4 → 10) is trained two ways with the *same total number of
optimizer steps*:

- **seed only**: the seed architecture, trained for all the steps;
- **search**: ``ModelSpace`` hill climbing (NASH-style): each round tries a few moves (Widen,
  Deepen, Grow — each keeps the function, so children start from the parent's weights), trains
  every child and the parent for a short budget, keeps the best on validation accuracy; the
  steps left at the end train the chosen architecture. Every step of every child counts.

Validation accuracy is what the search selects on; test accuracy (held out, never used for
selection) is the fair comparison. Run: ``python examples/search_digits.py [--out DIR]``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

from morphc.space import HillClimb, ModelSpace
from morphc.space.loading import load
from morphc.space.saving import save

BUDGET = 3000            # optimizer steps per method
SEARCH = dict(neighbors=3, child_steps=100, warmup_steps=200, final_steps=1000)
BATCH, LR = 64, 1e-2
HIDDEN = 8


def load_data(seed: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Train / validation / test splits (1000 / 400 / 397), features scaled to [0, 1]."""
    digits = load_digits()
    x = torch.tensor(digits.data / 16.0, dtype=torch.float32)
    y = torch.tensor(digits.target)
    idx = torch.arange(len(y))
    train, rest = train_test_split(idx, train_size=1000, stratify=y, random_state=seed)
    val, test = train_test_split(rest, train_size=400, stratify=y[rest], random_state=seed)
    return {name: (x[i], y[i]) for name, i in (("train", train), ("val", val), ("test", test))}


def make_trainer(data, seed: int):
    """``train(module, steps)``: Adam on random mini-batches; each call starts a fresh optimizer
    (the search trains many modules), the batch stream continues across calls."""
    generator = torch.Generator().manual_seed(seed)
    x, y = data["train"]

    def train(module: nn.Module, steps: int) -> None:
        optimizer = torch.optim.Adam(module.parameters(), lr=LR)
        module.train()
        for _ in range(steps):
            batch = torch.randint(len(y), (BATCH,), generator=generator)
            optimizer.zero_grad()
            F.cross_entropy(module(x[batch]), y[batch]).backward()
            optimizer.step()
    return train


def accuracy(module: nn.Module, split) -> float:
    x, y = split
    module.eval()
    with torch.no_grad():
        return float((module(x).argmax(dim=1) == y).float().mean())


def seed_model(seed: int) -> nn.Module:
    """Deliberately narrow (8 hidden units), so architecture is what limits it."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, 10))


def run(seed: int, data, out: Path | None) -> dict:
    """One seed: seed-only training and search, same budget; returns the table row."""
    start = time.perf_counter()
    baseline = seed_model(seed)
    make_trainer(data, seed)(baseline, BUDGET)
    baseline_time = time.perf_counter() - start

    start = time.perf_counter()
    space = ModelSpace(seed_model(seed), (data["val"][0][:64],))
    result = space.search(make_trainer(data, seed), lambda m: accuracy(m, data["val"]), BUDGET,
                          HillClimb(seed=seed, **SEARCH))
    search_time = time.perf_counter() - start
    found = result.module
    if out is not None:
        space.save(out / f"seed{seed}")
        save(found, out / f"seed{seed}" / "chosen")
        reloaded = load(out / f"seed{seed}" / "chosen")
        assert accuracy(reloaded, data["test"]) == accuracy(found, data["test"])
    return dict(
        seed=seed, steps=(BUDGET, result.steps),
        val=(accuracy(baseline, data["val"]), accuracy(found, data["val"])),
        test=(accuracy(baseline, data["test"]), accuracy(found, data["test"])),
        params=(sum(p.numel() for p in baseline.parameters()),
                sum(p.numel() for p in found.parameters())),
        arch=(space.graph.nodes[space.root]["summary"], space.graph.nodes[result.node]["summary"]),
        nodes=space.graph.number_of_nodes(), edges=space.graph.number_of_edges(),
        seconds=(baseline_time, search_time),
        code=found.code)


def print_table(rows: list[dict]) -> None:
    print(f"\n{'seed':>4} | {'method':<10} | {'steps':>5} | {'params':>6} | {'val acc':>7} | "
          f"{'test acc':>8} | {'time s':>6} | architecture")
    print("-" * 100)
    for row in rows:
        for i, method in enumerate(("seed only", "search")):
            arch = row["arch"][0] if i == 0 else \
                f"{row['arch'][1]}  ({row['nodes']} nodes, {row['edges']} moves explored)"
            print(f"{row['seed']:>4} | {method:<10} | {row['steps'][i]:>5} | "
                  f"{row['params'][i]:>6} | {row['val'][i]:>7.4f} | {row['test'][i]:>8.4f} | "
                  f"{row['seconds'][i]:>6.1f} | {arch}")
    for key in ("val", "test"):
        base = statistics.mean(r[key][0] for r in rows)
        found = statistics.mean(r[key][1] for r in rows)
        wins = sum(r[key][1] > r[key][0] for r in rows)
        print(f"mean {key} accuracy: seed only {base:.4f}, search {found:.4f} "
              f"(search better on {wins}/{len(rows)} seeds)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None,
                        help="where to save the explored spaces (default: a temporary dir)")
    args = parser.parse_args()
    torch.set_num_threads(1)      # tiny models: one thread beats two contended ones
    data = load_data()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [run(seed, data, args.out or Path(tmp)) for seed in range(args.seeds)]
    print_table(rows)
    if args.out is not None:
        print(f"\nexplored spaces (space.json, space.dot, space.svg if Graphviz is installed, "
              f"best.*, chosen.*) under {args.out}")
    print("\ncode of the architecture the last search chose:\n" + rows[-1]["code"])


if __name__ == "__main__":
    main()
