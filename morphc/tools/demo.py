"""``morphc demo``: Bypass escapes a saddle that plain Adam never leaves.

The problem is the teacher–student saddle of :mod:`morphc.zoo` (the bench's ``teacher_student``
problem): an 8→8→1 tanh student whose
hidden units start *identical*. Every unit then receives the same gradient, so Adam keeps them
identical forever: the student is effectively a one-unit network and its loss stalls on a
symmetric saddle. Bypass, run in the same loop with the same seed and the same step budget,
extends the student when the loss plateaus, trains, returns to the constraint set and folds the
branches back, exactly, into the student's own weights. The student keeps its architecture; its
hidden units are no longer identical, and plain training takes it from there.

Why the second layer: a bypass branch at ``z = W₂h + b₂`` adds ``B·ρ(Ah + a)``; once ``B ≠ 0``,
the gradient reaching ``h`` gets the extra term ``Aᵀ diag(ρ') Bᵀ δ``, different for every hidden
unit because the columns of ``A`` differ. A branch at the *first* layer cannot help: its ``B``
rows receive identical gradients (the error ``δ`` at the identical units is identical), so the
symmetry survives. (``sites="auto"``, which ranks sites by ‖∂L/∂B‖ on the training batch, ranks
the *first* layer highest here — a large escape signal that contraction then undoes — so the
library default is ``sites="all"``; see examples/README.md.)

Before training, the demo shows the compiler itself on a built-in CNN with BatchNorm: the
inspection report of the extended model, and the measured deviations of extension (E1) and
contraction (C1).

Output: a table (plain vs Bypass final training loss per seed, their ratio, and whether the
student is still symmetric), ``loss_curves.png`` and ``results.json`` in ``--out``. A progress bar
on stderr shows the training runs.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from morphc import zoo
from morphc.tools.cli_args import writable_dir

DEFAULT_SEEDS = 5
STEPS, LR = 2000, 1e-2       # the bench's teacher_student problem: full-batch Adam
PROBLEM = {"name": "teacher_student", "optimizer": f"Adam, lr {LR}", "loss": "mse, full batch",
           "model": "8→8→1 tanh student, hidden units identical; 6-unit tanh teacher"}
QUICK_STEPS = 1000

# one plain-language line per term the compiler report prints
GLOSSARY = (
    ("homotopy s", "1 = branches as trained (non-linear); 0 = on C, where they are linear "
                   "and fold"),
    ("constraint residual", "how far the branches are from C; 0 means the fold into the weights "
                            "is exact"),
    ("E1", "extending changes nothing: branches start with B = 0, outputs stay identical"),
    ("C1", "contracting changes nothing: folded into your weights, the outputs stay the same"),
)


def bypass_options() -> dict:
    """The Bypass settings of the demo: the library defaults (Plateau trigger over 100 steps,
    100 bypass + 100 annealed return steps, tanh branches of width 8 at every site), only
    quiet. Nothing here is tuned for this problem; see examples/README.md for alternatives."""
    return dict(verbose=False)


def compiler_report() -> str:
    """Extend and contract ``zoo.cnn_bn`` (with branches moved off B = 0 so the fold is not
    vacuous); return the inspection report and the measured E1 / C1 deviations."""
    import morphc
    from morphc import zoo
    from morphc.compiler.deviation import relative_deviation

    torch.manual_seed(0)
    model, inputs = zoo.cnn_bn()
    model.eval()
    ext = morphc.extend(model, inputs, sites="all", width=0.25)
    with torch.no_grad():
        e1 = relative_deviation(model(*inputs), ext(*inputs))
        for branch in ext.extension_branches.values():
            branch.B.normal_(0, 0.1)
        ext.set_homotopy(0.0)
        extended = ext(*inputs)
        report = str(morphc.inspect(ext))
        morphc.contract(ext)
        c1 = relative_deviation(extended, model(*inputs))
    return (f"{report}\nE1: extended vs original, max relative deviation {e1:.3g} "
            f"(bit-for-bit: {e1 == 0})\nC1: contracted vs extended on C, max relative "
            f"deviation {c1:.3g} (target ≤ 1e-6)\n\n{glossary()}\n")


def glossary() -> str:
    """What the report's terms mean, one line each."""
    width = max(len(term) for term, _ in GLOSSARY)
    return "\n".join(["what the terms mean:", *(f"  {term:<{width}}  {meaning}"
                                                 for term, meaning in GLOSSARY)])


def run(seed: int, steps: int, bypass: bool, progress: tqdm | None = None) -> dict:
    """Train one student, plain Adam or Adam + Bypass; same data, init and budget. ``progress``
    (a tqdm bar) advances one tick per step."""
    import morphc

    x, y, _, _ = zoo.teacher_student_data(seed)
    model = zoo.symmetric_student(seed)
    torch.manual_seed(seed)

    def factory(params):
        return torch.optim.Adam(params, lr=LR)

    def closure(module):
        return F.mse_loss(module(x), y)

    if bypass:
        stepper = morphc.Bypass(model, factory, seed=seed, **bypass_options())
    else:
        stepper = _Plain(model, factory(model.parameters()))
    start = time.perf_counter()
    losses = []
    for _ in range(steps):
        losses.append(float(stepper.step(closure)))
        if progress is not None:
            progress.update()
    final_model = stepper.finish()
    with torch.no_grad():
        final = float(F.mse_loss(final_model(x), y))
    events = [e for e in getattr(stepper, "history", []) if e["event"] in ("extend", "contract",
                                                                          "rollback")]
    return {"seed": seed, "method": "bypass" if bypass else "plain", "losses": losses,
            "final_loss": final, "symmetric": zoo.hidden_units_identical(final_model),
            "seconds": time.perf_counter() - start, "events": events,
            "cycles": sum(e["event"] == "contract" for e in events)}


class _Plain:
    """Plain training with the same ``step(closure)`` interface as Bypass."""

    def __init__(self, model, optimizer) -> None:
        self.model, self.optimizer = model, optimizer

    def step(self, closure):
        self.optimizer.zero_grad()
        loss = closure(self.model)
        loss.backward()
        self.optimizer.step()
        return loss.detach()

    def finish(self):
        return self.model


def ratios(results: list[dict]) -> dict[int, float]:
    """Final loss of Bypass over final loss of plain Adam, per seed."""
    final = {(r["seed"], r["method"]): r["final_loss"] for r in results}
    return {seed: final[seed, "bypass"] / final[seed, "plain"]
            for seed in sorted({r["seed"] for r in results})}


def table(results: list[dict]) -> str:
    """Per-seed final losses, their ratio, and the geometric mean of the ratios."""
    lines = [f"{'seed':>4}  {'plain':>10}  {'bypass':>10}  {'ratio':>8}  {'cycles':>6}  "
             f"{'plain sym.':>10}  {'bypass sym.':>11}"]
    per_seed = ratios(results)
    for seed, ratio in per_seed.items():
        plain, bp = (next(r for r in results if r["seed"] == seed and r["method"] == m)
                     for m in ("plain", "bypass"))
        lines.append(f"{seed:>4}  {plain['final_loss']:>10.4g}  {bp['final_loss']:>10.4g}  "
                     f"{ratio:>8.3g}  {bp['cycles']:>6}  {str(plain['symmetric']):>10}  "
                     f"{str(bp['symmetric']):>11}")
    values = list(per_seed.values())
    lines.append(f"geometric-mean ratio bypass/plain over {len(values)} seeds: "
                 f"{geometric_mean(values):.3g}  (worst {max(values):.3g})")
    return "\n".join(lines)


def geometric_mean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def plot(results: list[dict], path: Path) -> None:
    """Loss curves, plain dashed and Bypass solid, one colour per seed; cycles marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for r in results:
        colour = colours[r["seed"] % len(colours)]
        style = "--" if r["method"] == "plain" else "-"
        ax.semilogy(r["losses"], style, color=colour, lw=1.2,
                    label=f"{r['method']} seed {r['seed']}")
        for e in r["events"]:   # ▼ extend, ▲ contract, on the curve
            marker = {"extend": "v", "contract": "^"}.get(e["event"])
            if marker and 0 < e["step"] <= len(r["losses"]):
                ax.plot(e["step"] - 1, r["losses"][e["step"] - 1], marker, color=colour,
                        ms=7, mec="black", mew=0.6)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (MSE)")
    ax.set_title("teacher–student on a symmetric saddle: Adam (dashed) vs Adam + Bypass "
                 "(▼ extend, ▲ contract)", fontsize=10)
    ax.legend(ncol=2, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="morphc demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="demo-results", help="output directory")
    parser.add_argument("--seeds", type=int, default=DEFAULT_SEEDS, help="number of seeds")
    parser.add_argument("--steps", type=int, default=STEPS, help="training steps")
    parser.add_argument("--quick", action="store_true",
                        help=f"{QUICK_STEPS} steps and 2 seeds (for tests and CI)")
    args = parser.parse_args(argv)
    if args.seeds < 1 or args.steps < 1:
        parser.error("--seeds and --steps must be positive")   # 0 seeds: a table of nothing
    if args.quick:
        args.steps, args.seeds = min(args.steps, QUICK_STEPS), min(args.seeds, 2)
    return args


def main(argv=None) -> int:
    """Run the demo; print the table; save ``loss_curves.png`` and ``results.json``."""
    args = parse_args(argv)
    out = writable_dir(args.out, "--out")   # before minutes of training, not after
    print(compiler_report(), flush=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # a 512×8 MLP: more threads only add synchronisation
    try:
        results = _run_all(args)
    finally:
        torch.set_num_threads(threads)
    print(table(results))
    plot(results, out / "loss_curves.png")
    per_seed = ratios(results)
    summary = {"problem": PROBLEM, "steps": args.steps,
               "bypass_options": bypass_options(), "ratios": per_seed,
               "ratio_geometric_mean": geometric_mean(list(per_seed.values())),
               "results": [{k: v for k, v in r.items() if k != "losses"} for r in results]}
    (out / "results.json").write_text(json.dumps(summary, indent=1))
    print(f"saved {out / 'loss_curves.png'} and {out / 'results.json'}")
    return 0


def _run_all(args) -> list[dict]:
    print(f"teacher–student, {args.steps} full-batch Adam steps, seeds 0..{args.seeds - 1}: "
          "plain vs Bypass", flush=True)
    results = []
    with tqdm(total=2 * args.seeds * args.steps, unit="step", file=sys.stderr,
              mininterval=0.5, dynamic_ncols=True) as progress:
        for seed in range(args.seeds):
            for bypass in (False, True):
                progress.set_description(f"seed {seed} {'bypass' if bypass else 'plain'}")
                results.append(run(seed, args.steps, bypass, progress))
    return results


if __name__ == "__main__":
    raise SystemExit(main())
