"""A model torch.export cannot trace: the user sees morphc's typed TraceError, not torch's
partial graph printed to stderr first (twice: once per export attempt)."""

import logging
import sys

import pytest
import torch
from torch import nn

import morphc


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)

    def forward(self, x):
        h = self.a(x)
        if h.sum() > 0:          # defeats symbolic_trace and torch.export alike
            return h * 2
        return h


def test_a_model_neither_frontend_traces_raises_typed_and_writes_nothing(capfd):
    logger = logging.getLogger("torch.export._trace")
    filters, stderr = list(logger.filters), sys.stderr
    with pytest.raises(morphc.TraceError, match="data-dependent") as info:
        morphc.trace(DataDependent(), (torch.randn(3, 4),))
    out, err = capfd.readouterr()
    assert err == "" and out == ""
    assert "def forward" in info.value.__cause__.partial_fx_graph, "kept on the cause"
    assert logger.filters == filters and sys.stderr is stderr
