"""Outside-in probes of the public API: what a user passes that morphc did not expect (a
reentrant checkpoint, a BatchNorm with a cumulative average, a wrong argument to load, …).
Each test failed before its fix; errors are typed and say what to do."""

import pytest
import torch
import torch.utils.checkpoint as checkpoint
from torch import nn

import morphc


class Checkpointed(nn.Module):
    def __init__(self, reentrant: bool):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.reentrant = nn.Linear(4, 4), nn.Linear(4, 2), reentrant

    def forward(self, x):
        h = checkpoint.checkpoint(self.a, x, use_reentrant=self.reentrant)
        return self.b(torch.tanh(h))


@pytest.mark.filterwarnings("ignore:None of the inputs have requires_grad")
@pytest.mark.parametrize("frontend", ["auto", "export"])
def test_a_reentrant_checkpoint_is_refused_naming_use_reentrant_false(frontend):
    # was a SiteError about "the higher-order op linear (wrap_with_set_grad_enabled)" that
    # never said what to change; torch.export's graph froze the layers after it too
    with pytest.raises(morphc.TraceError, match=r"use_reentrant=False") as info:
        morphc.trace(Checkpointed(True), (torch.randn(3, 4),), frontend=frontend, cache=False)
    assert "Checkpointed runs a inside" in str(info.value)


def test_the_non_reentrant_checkpoint_the_error_names_extends():
    model, x = Checkpointed(False), torch.randn(3, 4)
    ext = morphc.extend(model, (x,), sites=["a", "b"])
    assert torch.equal(ext(x), model(x))
