"""Model factories the CLI tests load by path (``tests.cli_factories:small_cnn``)."""

import torch
from torch import nn


def small_cnn() -> nn.Module:
    """A module only: the CLI needs --input-shape (N, 3, H, W)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Conv2d(4, 8, 3, stride=2, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(8, 5))


def mlp_with_inputs():
    """A (model, example_inputs) pair, like morphc.zoo factories."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 2)), (torch.randn(3, 6),)


instance = nn.Sequential(nn.Linear(4, 3))   # an nn.Module, not a factory
not_a_model = 42                             # neither callable nor a module


def returns_text():
    return "not a model"


def needs_arguments(width):
    return nn.Linear(width, width)


def broken():
    raise RuntimeError("factory exploded")


class DataDependent(nn.Module):
    """Python control flow on tensor values: neither frontend can trace it."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:
            return self.fc(x)
        return x


class Masked(nn.Module):
    """Keyword inputs: a tensor mask and a non-tensor scale."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, x, mask=None, scale=1.0):
        if mask is not None:
            x = x * mask[..., None]
        return self.b(torch.tanh(self.a(x))) * scale


def masked_with_kwargs():
    """A (model, args, kwargs) triple."""
    torch.manual_seed(0)
    return Masked(), (torch.randn(2, 5, 6),), {"mask": torch.ones(2, 5), "scale": 2.0}


def masked_with_spec():
    """A mapping with torch.export's dynamic_shapes: the sequence varies, the batch is static."""
    model, args, kwargs = masked_with_kwargs()
    seq = torch.export.Dim("seq", max=32)
    return {"model": model, "args": args, "kwargs": kwargs,
            "dynamic_shapes": {"x": {1: seq}, "mask": {1: seq}, "scale": None}}


def mapping_with_typo():
    return {"model": Masked(), "args": (torch.randn(2, 5, 6),), "kwarg": {}}
