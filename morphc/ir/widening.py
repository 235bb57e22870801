"""Net2Net weight algebra: copy a layer's units and split what reads them, exactly.

``widen_layer`` decides *where* (which modules, which unit dimension, through which ops); this
module does the arithmetic on the weights: ``W1'[j] = W1[g(j)]`` for the producer, and
``W2'[:, j] = λ_j · W2[:, g(j)]`` with ``Σ_{g(j)=u} λ_j = 1`` for the consumer.
"""

from __future__ import annotations

import torch
from torch import nn

from morphc.ir.branch import BypassBranch
from morphc.ir.ops import NORMS


def unit_map(old: int, new: int, generator: torch.Generator | None) -> list[int]:
    """Identity on the first ``old`` units, then copies drawn without replacement (cycling
    through random permutations) so no unit is copied much more often than another."""
    mapping = list(range(old))
    while len(mapping) < new:
        mapping += torch.randperm(old, generator=generator).tolist()
    return mapping[:new]


def split_weights(mapping: list[int], noise: float, generator) -> torch.Tensor:
    """λ per new unit: ``(1 + ε_j)/n_u`` with ε centred over the copies of each unit u."""
    index = torch.tensor(mapping)
    counts = torch.bincount(index).to(torch.float64)
    eps = torch.randn(len(mapping), generator=generator, dtype=torch.float64) * noise
    mean = torch.zeros_like(counts).index_add_(0, index, eps) / counts
    eps = eps - mean[index]
    return (1.0 + eps) / counts[index]


def resized(module: nn.Module, **sizes) -> nn.Module:
    """A module of the same class and hyper-parameters as ``module`` with new sizes."""
    factory = dict(device=module.weight.device, dtype=module.weight.dtype) \
        if getattr(module, "weight", None) is not None else {}
    if isinstance(module, nn.Linear):
        new = nn.Linear(sizes.get("in_features", module.in_features),
                        sizes.get("out_features", module.out_features),
                        bias=module.bias is not None, **factory)
    elif isinstance(module, nn.modules.conv._ConvNd):
        new = type(module)(sizes.get("in_channels", module.in_channels),
                           sizes.get("out_channels", module.out_channels), module.kernel_size,
                           module.stride, module.padding, module.dilation, module.groups,
                           module.bias is not None, module.padding_mode, **factory)
    else:   # BatchNorm
        new = type(module)(sizes["num_features"], module.eps, module.momentum, module.affine,
                           module.track_running_stats, **factory)
    return new.train(module.training)


def set_tensor(module: nn.Module, name: str, value: torch.Tensor | None) -> None:
    target = getattr(module, name)
    if target is not None and value is not None:
        with torch.no_grad():
            target.copy_(value.to(target.dtype))


def widen_out(module: nn.Module, index: torch.Tensor, new: int, block: int = 1) -> nn.Module:
    """site1 / BatchNorm / PReLU: unit j becomes a copy of unit g(j); a norm or PReLU after a
    flatten holds ``block`` features per unit, copied together."""
    if isinstance(module, (nn.PReLU, *NORMS)):
        def copied(value: torch.Tensor) -> torch.Tensor:
            return value.reshape(-1, block)[index].reshape(-1)
    if isinstance(module, nn.PReLU):     # one slope per feature: copy it like the unit
        out = nn.PReLU(new * block, dtype=module.weight.dtype, device=module.weight.device)
        set_tensor(out, "weight", copied(module.weight))
        return out.train(module.training)
    if isinstance(module, NORMS):
        out = resized(module, num_features=new * block)
        for name in ("weight", "bias", "running_mean", "running_var"):
            value = getattr(module, name)
            set_tensor(out, name, None if value is None else copied(value))
        set_tensor(out, "num_batches_tracked", module.num_batches_tracked)
        return out
    key = "out_features" if isinstance(module, nn.Linear) else "out_channels"
    out = resized(module, **{key: new})
    set_tensor(out, "weight", module.weight[index])
    set_tensor(out, "bias", None if module.bias is None else module.bias[index])
    return out


def split_columns(weight: torch.Tensor, index, split, block: int) -> torch.Tensor:
    """Input column block j ← λ_j · column block g(j), in float64."""
    weight = weight.detach().to(torch.float64)
    rows = weight.shape[0]
    grouped = weight.reshape(rows, -1, block, *weight.shape[2:])
    scale = split.reshape(1, -1, *([1] * (grouped.dim() - 2)))
    return (grouped[:, index] * scale).reshape(rows, -1, *weight.shape[2:])


def copy_rows(weight: torch.Tensor, index, block: int) -> torch.Tensor:
    """Output row block j ← row block g(j)."""
    grouped = weight.detach().reshape(-1, block, *weight.shape[1:])
    return grouped[index].reshape(-1, *weight.shape[1:])


def widen_branch(branch: BypassBranch, index, split, reads: int | None,
                  writes: int | None) -> None:
    """A bypass branch around the widened layer: split A's input columns if it reads the units,
    copy B's output rows if it writes them (B stays zero when it was). ``reads``/``writes``: the
    block factor where it does, None where it does not."""
    if reads is not None:
        branch.A = nn.Parameter(split_columns(branch.A, index, split, reads).to(branch.A.dtype))
        branch.in_features = branch.A.shape[1] * (branch.conv.groups if branch.conv else 1)
    if writes is not None:
        branch.B = nn.Parameter(copy_rows(branch.B, index, writes))
        branch.out_features = branch.B.shape[0]


def widen_in(module: nn.Module, index: torch.Tensor, split: torch.Tensor, block: int):
    """site2: column block j is λ_j times column block g(j)."""
    new_weight = split_columns(module.weight, index, split, block)
    key = "in_features" if isinstance(module, nn.Linear) else "in_channels"
    out = resized(module, **{key: new_weight.shape[1]})
    set_tensor(out, "weight", new_weight)
    set_tensor(out, "bias", module.bias)
    return out
