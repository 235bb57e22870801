"""The compiler probed from outside with architectures and PyTorch features the repository
does not ship: each case keeps E1 (bit-exact at B = 0) and C1 (an exact fold into the user's
own Parameters), or is refused with a typed error that leaves the user's model as it was."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import morphc
from tests.helpers import max_rel, train_extension


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))


def _fold(model, args, ext):
    """Train ``ext`` off B = 0, contract at s = 0; returns (extended output, folded output)."""
    params = dict(model.named_parameters())
    train_extension(ext, args)
    ext.set_homotopy(0.0)
    with torch.no_grad():
        extended = ext(*args)
    assert morphc.contract(ext) is model
    assert all(p is params[n] for n, p in model.named_parameters())
    with torch.no_grad():
        return extended, model(*args)


@pytest.mark.parametrize("context", [torch.inference_mode, torch.no_grad])
def test_extending_inside_inference_mode_gives_branches_that_train(context):
    """``morphc.extend`` called inside ``torch.inference_mode()`` (an evaluation block) made
    the branch parameters inference tensors: the first training step failed with torch's
    "Inference tensors cannot be saved for backward"."""
    model, x = _mlp(), torch.randn(4, 8)
    with context():
        ext = morphc.extend(model, (x,), sites="all", width=4)
    assert not any(p.is_inference() for p in ext.parameters())
    with torch.no_grad():
        assert torch.equal(ext(x), model(x))
    extended, folded = _fold(model, (x,), ext)
    assert max_rel(folded, extended) < 1e-6


def test_contract_inside_inference_mode():
    model, x = _mlp(), torch.randn(4, 8)
    ext = morphc.extend(model, (x,), sites="all", width=4)
    train_extension(ext, (x,))
    ext.set_homotopy(0.0)
    with torch.no_grad():
        extended = ext(x)
    with torch.inference_mode():
        morphc.contract(ext)
    assert not any(p.is_inference() for p in model.parameters())
    with torch.no_grad():
        assert max_rel(model(x), extended) < 1e-6
    F.mse_loss(model(x), torch.zeros(4, 3)).backward()      # the user's model still trains
