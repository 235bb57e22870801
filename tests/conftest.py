import os

import pytest
import torch

# One intra-op thread per pytest-xdist worker: `make test` runs 2 workers on 2 cores, and two
# threads each oversubscribe the machine (a ResNet forward went from ~1 ms to ~500 ms).
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
