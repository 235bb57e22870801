import pytest

from morphc.runtime.cycle import Cycle


@pytest.fixture
def never_pays(monkeypatch):
    """Every trainer cycle misses: what is left must be plain training's state."""
    monkeypatch.setattr(Cycle, "pays", lambda self, before, after: False)
