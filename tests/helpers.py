"""Shared test helpers: train an extension a little, then check the fold."""

import torch

import morphc
import morphc.compiler.deviation


def train_extension(ext, inputs, steps=5, lr=1e-2, seed=0):
    """A few Adam steps on a random regression target, so every branch moves off B = 0.
    Outputs may be any pytree (dict, namedtuple, tuple with None): every floating leaf counts."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        outs = _floating_leaves(ext(*inputs))
    targets = [torch.randn(out.shape, generator=gen, dtype=out.dtype) for out in outs]
    opt = torch.optim.Adam(ext.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        loss = sum(torch.nn.functional.mse_loss(out, target)
                   for out, target in zip(_floating_leaves(ext(*inputs)), targets, strict=True))
        loss.backward()
        opt.step()
    return ext


def _floating_leaves(output):
    return [t for t in torch.utils._pytree.tree_leaves(output)
            if isinstance(t, torch.Tensor) and t.is_floating_point()]


def max_rel(a, b):
    return morphc.compiler.deviation.relative_deviation(a, b)
