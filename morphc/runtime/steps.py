"""One optimizer step of a Bypass run, with the checks that keep a user's weights whole.

A step never writes non-finite values: a non-finite loss or gradient stops it before the
optimizer moves anything (:class:`NonFinite`), and the caller skips the step or rolls the cycle
back. The joint free step trains ``L(s=0) + L(s=1)`` as two forward/backward passes, because the
homotopy is a buffer autograd saves: it cannot change inside one graph.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterable

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from morphc.errors import BypassError

Closure = Callable[[nn.Module], torch.Tensor]


class NonFinite(Exception):
    """A loss or gradient was NaN/Inf; nothing was stepped."""

    def __init__(self, what: str, value: float) -> None:
        super().__init__(f"non-finite {what} ({value})")
        self.what, self.value = what, value


def loss_of(closure: Closure, module: nn.Module,
            reduce: Callable[[float, torch.device], float] | None = None) -> tuple[torch.Tensor,
                                                                                  float]:
    """``closure(module)`` checked to be a scalar tensor; its value (mean over ranks)."""
    loss = closure(module)
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise BypassError(f"the closure must return the loss as a scalar tensor, got "
                          f"{_described(loss)}: return the loss alone, with autograd on (e.g. "
                          "lambda m: F.cross_entropy(m(x), y)); keep other outputs in a "
                          "variable outside the closure")
    value = float(loss.detach())
    if reduce is not None:
        value = reduce(value, loss.device)
    return loss, value


def _described(value) -> str:
    """What a closure returned, in a few words (a tensor's shape, not its values)."""
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    if isinstance(value, tuple | list):
        return f"a {type(value).__name__} of {len(value)} (" + \
            ", ".join(_described(v) for v in value[:3]) + ")"
    return f"a {type(value).__name__}"


def no_backward_yet(params: Iterable[nn.Parameter]) -> None:
    """Raise when the closure ran a backward itself (the ``optimizer.step(closure)`` habit): the
    caller cleared every gradient before calling it. Bypass's own backward would then fail
    untyped, or — with ``retain_graph=True`` — step on doubled gradients."""
    if any(p.grad is not None for p in params):
        raise BypassError("the closure called backward() itself: bp.step does zero_grad, "
                          "backward and the optimizer step. Return the loss without calling "
                          "backward (clip with max_grad_norm=; accumulate micro-batches by "
                          "returning the mean of their losses)")


_optimizer_steps = [0, None]      # steps any optimizer of this process took; the hook's handle


def _count_optimizer_step(*_) -> None:
    _optimizer_steps[0] += 1


def optimizer_steps() -> int:
    """How many optimizer steps any optimizer of this process has taken since this was first
    asked (a global step post-hook, registered once)."""
    if _optimizer_steps[1] is None:
        _optimizer_steps[1] = register_optimizer_step_post_hook(_count_optimizer_step)
    return _optimizer_steps[0]


def watched_for_grads(groups: list[dict], keep: int = 2) -> list[nn.Parameter]:
    """The first and last trainable parameters of the optimizer (``keep`` spread between), that
    :func:`grads_left` watches: a backward by hand through the model reaches them all, and
    reading every parameter's gradient each step costs a large model more than the check is
    worth (~1 ms at 300 parameters)."""
    params = [p for g in groups for p in g["params"] if p.requires_grad]
    if len(params) <= keep:
        return params
    return [params[round(i * (len(params) - 1) / (keep - 1))] for i in range(keep)]


def grads_left(params: list[nn.Parameter]) -> tuple[int, list[tuple]]:
    """The optimizer steps taken so far, and each parameter with its version counter and its
    gradient as a step leaves it (and that gradient's version): what :func:`grads_dropped`
    compares at the next step."""
    return optimizer_steps(), [(p, p._version, p.grad, None if p.grad is None else
                                p.grad._version) for p in params]


def grads_dropped(left: tuple[int, list[tuple]] | None) -> bool:
    """Whether a backward ran between two steps and left gradients that no optimizer step took
    (micro-batches accumulated by hand before the step meant to take them): the next step's
    ``zero_grad`` drops them, as a plain loop's ``zero_grad`` would, and a user who meant to
    accumulate should hear it. Gradients cleared or zeroed between steps are nothing lost;
    after any optimizer step in between, or with the parameter moved, they are another loss's
    (a GAN's generator loss through the discriminator, another Bypass over the same
    optimizer)."""
    if left is None or optimizer_steps() != left[0]:
        return False
    for param, version, grad, grad_version in left[1]:
        now = param.grad
        if now is None or param._version != version or \
                now is grad and now._version == grad_version:
            continue
        with torch.no_grad():
            if bool(_values(now).any()):
                return True
    return False


def backward_checked(loss: torch.Tensor, value: float) -> None:
    if not math.isfinite(value):
        raise NonFinite("loss", value)
    if not loss.requires_grad:
        raise BypassError("the closure's loss does not require grad: it was computed under "
                          "torch.no_grad() / inference_mode, or detached (e.g. .item()); "
                          "return the loss tensor itself, with autograd on")
    try:
        loss.backward()
    except RuntimeError as exc:     # only step 0 is checked for a closure's own backward
        if "backward through the graph a second time" not in str(exc):
            raise
        raise BypassError("the loss's graph was already freed: the closure called backward() "
                          "(or autograd.grad without create_graph) on it itself — bp.step does "
                          "zero_grad, backward and the optimizer step, so return the loss "
                          "without calling backward (clip with max_grad_norm=) — or it reuses a "
                          "tensor from an earlier step's graph (detach state carried across "
                          "steps, e.g. an RNN's hidden state)") from exc


def grad_norm(params: Iterable[nn.Parameter]) -> float:
    """The total gradient norm (0.0 with no gradient); raises :class:`NonFinite` when NaN/Inf."""
    grads = [p.grad for p in params if p.grad is not None]
    norm = float(_total_norm(grads)) if grads else 0.0
    if not math.isfinite(norm):
        raise NonFinite("gradient", norm)
    return norm


def check_finite(params: Iterable[nn.Parameter]) -> None:
    """Raise :class:`NonFinite` when some gradient holds NaN/Inf — without a norm.

    On dense gradients of one CPU/CUDA device this is the one fused kernel
    ``torch.amp.GradScaler`` runs (an unscale by exactly 1.0, so every gradient keeps its bits)
    into a flag kept per device and thread: ~15 µs in a small model's step where a norm costs
    ~40, and every watched step pays it. Sparse gradients (``nn.Embedding(sparse=True)``),
    several devices or tensor subclasses are checked tensor by tensor."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    device = grads[0].device
    if _plain_on_one_device(grads):
        found, one = _flag(device)
        found.zero_()
        torch._amp_foreach_non_finite_check_and_unscale_(grads, found, one)
        bad = bool(found.item())
    else:
        with torch.no_grad():
            bad = not all(bool(torch.isfinite(_values(g)).all()) for g in grads)
    if bad:
        raise NonFinite("gradient", math.nan)


_flags = threading.local()


def _flag(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(found, 1.0)`` for :func:`check_finite` on ``device``, made once per thread: two
    small allocations cost a watched step of a small model as much as the check itself."""
    made = getattr(_flags, "by_device", None)
    if made is None:
        made = _flags.by_device = {}
    pair = made.get(device)
    if pair is None:
        pair = made[device] = (torch.zeros(1, device=device), torch.ones(1, device=device))
    return pair


def _plain_on_one_device(grads: list[torch.Tensor]) -> bool:
    """Dense plain tensors on one CPU/CUDA device: what the fused foreach kernels take as is
    (sparse gradients, tensor subclasses and several devices take the general paths)."""
    device = grads[0].device
    return device.type in ("cpu", "cuda") and all(
        type(g) is torch.Tensor and g.layout is torch.strided and g.device == device
        for g in grads)


def _values(grad: torch.Tensor) -> torch.Tensor:
    """The stored values of a gradient: itself when dense, its non-zeros when sparse."""
    if grad.layout is torch.strided:
        return grad
    return grad.coalesce().values() if grad.layout is torch.sparse_coo else grad.values()


def _total_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """``nn.utils.get_total_norm(grads)``, bit for bit: on one CPU/CUDA device and dtype with
    plain tensors it makes the same three calls (``_foreach_norm``, ``stack``, ``vector_norm``)
    without the grouping and wrappers around them, which cost more than the norm on small
    models; anything else goes to ``get_total_norm`` itself."""
    dtype = grads[0].dtype
    if _plain_on_one_device(grads) and all(g.dtype == dtype for g in grads):
        with torch.no_grad():
            return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, 2.0)), 2.0)
    return nn.utils.get_total_norm(grads)


def clip(params: list[nn.Parameter], max_norm: float | None) -> None:
    if max_norm is not None:
        nn.utils.clip_grad_norm_(params, max_norm)


def zero_grads(params: Iterable[nn.Parameter]) -> None:
    for param in params:
        param.grad = None


def broken_weight(model: nn.Module) -> str | None:
    """The first parameter holding NaN/Inf: a loss that is non-finite because of it is not a
    bad batch, and skipping steps cannot mend it."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.is_floating_point() and not bool(torch.isfinite(param).all()):
                return name
    return None


def set_aside(params: list[nn.Parameter]) -> list[torch.Tensor | None]:
    """Take the first backward's gradients off ``params`` before a joint step calls the closure
    again: a closure that clears gradients first (``optimizer.zero_grad()``, torch's closure
    habit, harmless in plain training) would otherwise drop the s = 0 half of the step. A
    gradient that is a view (DDP's ``gradient_as_bucket_view``) is copied: the next backward
    writes into the storage it views."""
    kept = [None if p.grad is None else p.grad.clone() if p.grad._base is not None else p.grad
            for p in params]
    for param in params:
        param.grad = None
    return kept


def add_back(params: list[nn.Parameter], kept: list[torch.Tensor | None]) -> None:
    """Sum the set-aside gradients with the second backward's, in place into the first (what
    autograd's accumulation computes: the same bits)."""
    with torch.no_grad():
        for param, first in zip(params, kept, strict=True):
            if first is None:
                continue
            if param.grad is not None:
                first.add_(param.grad)
            param.grad = first


def put_back(buffers: list[torch.Tensor], backup: list[torch.Tensor]) -> None:
    """Buffers (BatchNorm statistics) as they were before a step's forward."""
    if buffers:
        with torch.no_grad():
            torch._foreach_copy_(buffers, backup)
