"""Shared test helpers: train an extension a little, then check the fold."""

import torch

import morphc
import morphc.compiler.deviation


def train_extension(ext, inputs, steps=5, lr=1e-2, seed=0):
    """A few Adam steps on a random regression target, so every branch moves off B = 0."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        out = ext(*inputs)
    target = torch.randn(out.shape, generator=gen, dtype=out.dtype)
    opt = torch.optim.Adam(ext.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(ext(*inputs), target)
        loss.backward()
        opt.step()
    return ext


def max_rel(a, b):
    return morphc.compiler.deviation.relative_deviation(a, b)
