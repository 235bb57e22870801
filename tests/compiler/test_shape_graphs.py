"""An extended model takes the shapes the eager model takes, also where torch.export fixed or
guarded a dimension: it traces the model again at that shape with the same branches (E1 bit for
bit, C1 on every shape after training), bounded, reported, and refused with a typed error where
the model itself refuses the shape or a user's dynamic_shapes fixed it."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import morphc
from morphc.compiler.deviation import relative_deviation


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class EvenPad(nn.Module):
    """Pads odd lengths to even in Python (like HF MobileNetV2's ``apply_tf_padding``): export
    guards the length's parity, the eager model takes any length. ``short`` uses a weight only
    below a length, ``refuse_above`` makes the eager model itself refuse long inputs."""

    def __init__(self, refuse_above=64):
        super().__init__()
        self.conv = nn.Conv1d(3, 6, 3, stride=2)
        self.fc = nn.Linear(6, 4)
        self.short = nn.Linear(6, 6)
        self.refuse_above = refuse_above

    def forward(self, x, scale=1.0):
        if x.shape[-1] > self.refuse_above:
            raise ValueError(f"length {x.shape[-1]} > {self.refuse_above}")
        if x.shape[-1] % 2:
            x = F.pad(x, (0, 1))
        h = torch.tanh(self.conv(x)).mean(-1)
        if x.shape[-1] < 12:
            h = self.short(h)
        return self.fc(h) * scale


def _extend(model, x, **options):
    ext = morphc.extend(model, (x,), kwargs={"scale": 2.0}, sites="all", width=4,
                        frontend="export", **options)
    assert ext.traced.frontend == "export"
    return ext


def test_a_guarded_shape_is_traced_again_with_the_same_branches():
    torch.manual_seed(0)
    model, x = EvenPad(), torch.randn(2, 3, 8)
    ext = _extend(model, x)
    assert {s.name for s in ext.sites} == {"conv", "fc", "short"}
    lengths = [8, 9, 13, 16, 7]
    batches = {n: torch.randn(3, 3, n) for n in lengths}
    with pytest.warns(UserWarning, match=r"traced its model again for inputs \(3, 3, 9\)"):
        with torch.no_grad():
            assert torch.equal(ext(batches[9], scale=2.0), model(batches[9], scale=2.0))  # E1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.no_grad():
            for n, b in batches.items():
                assert torch.equal(ext(b, scale=2.0), model(b, scale=2.0)), n
    # 9, 13 and 7 are odd; 16 is even but skips `short`: each a graph of its own
    assert len(ext.retraces) == len(ext.shape_graphs.graphs) >= 2
    assert all(r.seconds > 0 and "dimension 2" in r.reason for r in ext.retraces)
    optimizer = torch.optim.Adam([*model.parameters(), *ext.extension_parameters()], lr=0.02)
    targets = {n: torch.randn(3, 4) for n in lengths}
    for _ in range(3):                               # train on every shape, both graphs
        for n, b in batches.items():
            optimizer.zero_grad()
            F.mse_loss(ext(b, scale=2.0), targets[n]).backward()
            optimizer.step()
    assert all(float(b.B.abs().sum()) > 0 for b in ext.branches.values())
    ext.set_homotopy(0.0)
    with torch.no_grad():
        expected = {n: ext(b, scale=2.0) for n, b in batches.items()}
    assert morphc.contract(ext) is model
    with torch.no_grad():
        for n, b in batches.items():                                                     # C1
            assert relative_deviation(expected[n], model(b, scale=2.0)) <= 1e-6, n


def test_later_extensions_reuse_the_cached_trace():
    torch.manual_seed(0)
    model, x = EvenPad(), torch.randn(2, 3, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        first = _extend(model, x)
        first(torch.randn(2, 3, 9), scale=2.0)
        again = _extend(model, x)
        again(torch.randn(2, 3, 9), scale=2.0)
    assert not first.retraces[0].cached and again.retraces[0].cached


def test_shapes_that_cannot_be_served_stay_typed_errors():
    torch.manual_seed(0)
    model, x = EvenPad(refuse_above=10), torch.randn(2, 3, 8)
    ext = _extend(model, x)
    # the model itself refuses: the graph's error, with the model's reason
    for _ in range(2):                       # the second time from the refusal cache
        with pytest.raises(morphc.ShapeError, match=r"input 'x', dimension 2: .*dynamic_shapes"
                                                    r".*length 11 > 10"):
            ext(torch.randn(2, 3, 11), scale=2.0)
    assert not ext.retraces
    # no re-trace allowed
    off = _extend(model, x, max_retraces=0)
    with pytest.raises(morphc.ShapeError, match="input 'x', dimension 2.*max_retraces=0"):
        off(torch.randn(2, 3, 9), scale=2.0)
    # a user's dynamic_shapes is taken as meant: its static dims are not traced again
    spec = {"x": {0: torch.export.Dim.AUTO}, "scale": None}
    user = morphc.extend(model, (x,), kwargs={"scale": 2.0}, dynamic_shapes=spec, sites="all")
    with pytest.raises(morphc.ShapeError, match="dynamic_shapes was given"):
        user(torch.randn(2, 3, 10), scale=2.0)
    # ... unless the user allows it
    allowed = morphc.extend(model, (x,), kwargs={"scale": 2.0}, dynamic_shapes=spec,
                            sites="all", max_retraces=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        allowed(torch.randn(2, 3, 10), scale=2.0)
        with pytest.raises(morphc.ShapeError, match="holds 1 more graphs"):
            allowed(torch.randn(2, 3, 6), scale=2.0)


class Switch(nn.Module):
    """Above a length the shared weight is also used outside a linear operator."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(5, 5)

    def forward(self, x):
        y = self.fc(x)
        if x.shape[1] > 4:
            y = y + self.fc.weight.sum()
        return y


def test_a_graph_that_uses_a_site_differently_is_refused():
    model, x = Switch(), torch.randn(2, 3, 5)
    ext = morphc.extend(model, (x,), sites="all", frontend="export")
    with pytest.raises(morphc.ShapeError, match="weight of site fc is excluded"):
        ext(torch.randn(2, 6, 5))
    other = torch.randn(2, 2, 5)                 # a shape the first graph takes still works
    with torch.no_grad():
        assert torch.equal(ext(other), model(other))


def test_bypass_cycle_runs_on_shapes_the_first_graph_refuses():
    torch.manual_seed(0)
    model = EvenPad()
    data = {n: (torch.randn(4, 3, n), torch.randn(4, 4)) for n in (8, 9)}
    bp = morphc.Bypass(model, lambda params: torch.optim.Adam(params, lr=0.01),
                       trigger=morphc.Schedule(at=[2]), bypass_steps=4, return_steps=4,
                       sites="all", width=4, accept="always", verbose=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(14):
            x, y = data[8 if step % 2 else 9]
            bp.step(lambda m, x=x, y=y: F.mse_loss(m(x), y))
    kinds = [e["event"] for e in bp.history]
    assert "contract" in kinds and "rollback" not in kinds, bp.history
    assert any("traced its model again" in str(w.message) for w in caught)
    assert bp.finish() is model
