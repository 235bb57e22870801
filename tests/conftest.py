import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch


def _use_this_checkouts_passes() -> None:
    """The editable install maps ``morphc.passes`` to the checkout it was installed from, so the
    tests of a git worktree would run another checkout's ``passes/`` beside their own ``morphc/``.
    Load this checkout's instead (a no-op in the installed checkout itself)."""
    root = Path(__file__).resolve().parents[1]
    passes = root / "passes"
    if not (passes / "__init__.py").is_file():
        return
    import morphc
    if Path(morphc.__file__).resolve().parent != root / "morphc":
        return
    loaded = sys.modules.get("morphc.passes")
    if loaded is not None and Path(loaded.__file__).resolve().parent == passes:
        return
    spec = importlib.util.spec_from_file_location("morphc.passes", passes / "__init__.py",
                                                  submodule_search_locations=[str(passes)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["morphc.passes"] = module
    spec.loader.exec_module(module)


_use_this_checkouts_passes()

# One intra-op thread per pytest-xdist worker: `make test` runs 2 workers on 2 cores, and two
# threads each oversubscribe the machine (a ResNet forward went from ~1 ms to ~500 ms).
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
