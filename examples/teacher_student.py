"""Bypass in a plain PyTorch loop: a student stuck on a symmetric saddle escapes.

A tanh teacher with 6 hidden units labels random inputs; an 8-unit student starts with all its
hidden units identical (same incoming weights, same bias, same outgoing weight). Gradient
descent gives identical units identical updates, so plain Adam keeps the student a one-unit
network forever. The same loop with ``morphc.Bypass`` (three changed lines) escapes: on a loss
plateau it extends the student, trains, anneals back onto the constraint set and folds the
branches into the student's own weights, which come back as the same object with the same
architecture.

    python examples/teacher_student.py [--steps 2000] [--seed 0]
"""

import argparse

import torch
import torch.nn.functional as F
from torch import nn

import morphc


def teacher_student(seed: int, n: int = 512, d: int = 8, teacher: int = 6, student: int = 8):
    """Data from a random tanh teacher, and a student whose hidden units are identical."""
    g = torch.Generator().manual_seed(seed)
    w1 = 2.0 * torch.linalg.qr(torch.randn(d, d, generator=g))[0][:teacher]
    b1 = 0.5 * torch.randn(teacher, generator=g)
    w2 = torch.tensor([(-1.0) ** j for j in range(teacher)])
    x = torch.randn(n, d, generator=g)
    y = (torch.tanh(x @ w1.T + b1) @ w2).unsqueeze(1)
    y = y / y.std()
    model = nn.Sequential(nn.Linear(d, student), nn.Tanh(), nn.Linear(student, 1))
    with torch.no_grad():   # the symmetric saddle: every hidden unit is the same unit
        model[0].weight.copy_((torch.randn(d, generator=g) / d**0.5).expand(student, d))
        model[0].bias.zero_()
        model[2].weight.fill_(1.0 / student)
        model[2].bias.zero_()
    return model, x, y


def units_identical(model: nn.Module) -> bool:
    w1, b1, w2 = model[0].weight, model[0].bias, model[2].weight
    return bool((w1 == w1[0]).all() and (b1 == b1[0]).all() and (w2 == w2[0, 0]).all())


def train(steps: int, seed: int, bypass: bool) -> tuple[nn.Module, list[float], list[dict]]:
    model, x, y = teacher_student(seed)

    def closure(m):   # takes the module to call *now*: the student, or its extension
        return F.mse_loss(m(x), y)

    if bypass:
        bp = morphc.Bypass(model, lambda params: torch.optim.Adam(params, lr=1e-2), seed=seed)
        losses = [bp.step(closure).item() for _ in range(steps)]
        return bp.finish(), losses, bp.history
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = closure(model)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return model, losses, []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    plain, plain_losses, _ = train(args.steps, args.seed, bypass=False)
    student, losses, history = train(args.steps, args.seed, bypass=True)
    print(f"plain Adam : final loss {plain_losses[-1]:.4g}, hidden units identical: "
          f"{units_identical(plain)}")
    print(f"with Bypass: final loss {losses[-1]:.4g}, hidden units identical: "
          f"{units_identical(student)}  (ratio {losses[-1] / plain_losses[-1]:.3g})")
    print(f"the student is still a {type(student).__name__} with "
          f"{sum(p.numel() for p in student.parameters())} parameters; what Bypass did:")
    for event in history:
        extra = {k: event[k] for k in ("sites", "residual", "deviation") if k in event}
        print(f"  step {event['step']:>5}: {event['event']:<8} loss={event['loss']} {extra}")


if __name__ == "__main__":
    main()
