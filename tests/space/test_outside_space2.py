"""Model-space moves probed from outside, second round: activations the op tables did not know
(Hardswish, SELU, CELU, Softsign, LogSigmoid, Tanhshrink …, their functional, in-place and
method forms), in-place activations written as statements, and moves called inside
``torch.inference_mode()``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from morphc.passes.widen_layer import widenable_pairs
from torch import nn

import morphc
from morphc.errors import SiteError
from morphc.space.move_base import private_copy
from morphc.space.moves import Deepen, Widen, deepen_points


def outputs(module: nn.Module, inputs: tuple) -> torch.Tensor:
    module.eval()
    with torch.no_grad():
        return module(*inputs)


def relative_change(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / a.abs().max())


class Between(nn.Module):
    """``fc2(act(fc1(x)))`` with ``act`` any callable: a module, a function or a method."""

    def __init__(self, act, module: nn.Module | None = None):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2 = nn.Linear(5, 6), nn.Linear(6, 3)
        self.act, self.module = act, module

    def forward(self, x):
        h = self.fc1(x)
        return self.fc2(self.module(h) if self.module is not None else self.act(h))


_PER_UNIT = {
    "Hardswish": (None, nn.Hardswish()), "Hardsigmoid": (None, nn.Hardsigmoid()),
    "SELU": (None, nn.SELU()), "CELU": (None, nn.CELU(0.7)), "Softsign": (None, nn.Softsign()),
    "LogSigmoid": (None, nn.LogSigmoid()), "Tanhshrink": (None, nn.Tanhshrink()),
    "Softshrink": (None, nn.Softshrink(0.3)), "Hardshrink": (None, nn.Hardshrink(0.2)),
    "Threshold": (None, nn.Threshold(0.1, -1.0)), "Hardswish-inplace": (None, nn.Hardswish(True)),
    "F.hardswish": (F.hardswish, None), "F.hardsigmoid": (F.hardsigmoid, None),
    "F.selu": (F.selu, None), "torch.celu": (torch.celu, None), "F.softsign": (F.softsign, None),
    "F.logsigmoid": (F.logsigmoid, None), "F.tanhshrink": (F.tanhshrink, None),
    "F.relu_": (F.relu_, None), "F.elu_": (F.elu_, None), "torch.sigmoid_": (torch.sigmoid_, None),
    "x.sigmoid_()": (lambda h: h.sigmoid_(), None), "x.tanh_()": (lambda h: h.tanh_(), None),
    "x.relu_()": (lambda h: h.relu_(), None),
}


@pytest.mark.parametrize("name", _PER_UNIT)
def test_widening_passes_through_every_per_unit_activation_and_deepening_finds_it(name):
    """These activations are parameter-free and per unit, so copies of a unit stay copies
    through them; the op tables did not list them, so Widen refused ("mixes units") and
    Deepen did not offer them."""
    act, module = _PER_UNIT[name]
    model = Between(act, module).double()
    inputs = (torch.randn(8, 5, dtype=torch.float64),)
    gm = private_copy(model, inputs)
    assert widenable_pairs(gm) == [("fc1", "fc2")]
    wide = Widen("fc1", to=11)(model, inputs)
    assert wide.get_submodule("fc2").in_features == 11
    assert relative_change(outputs(model, inputs), outputs(wide, inputs)) <= 1e-12
    (point,) = deepen_points(gm)
    deep = Deepen(at=point)(model, inputs)
    assert torch.equal(outputs(deep, inputs), outputs(model, inputs))


@pytest.mark.parametrize("act", [nn.RReLU(), nn.GLU()])
def test_activations_that_are_not_per_unit_copies_still_stop_widening(act):
    """RReLU draws a slope per element in train mode and GLU halves its input: copies of a
    unit would stop being copies, so widening through them stays refused."""
    model = Between(None, act)
    if isinstance(act, nn.GLU):
        model.fc2 = nn.Linear(3, 3)
    inputs = (torch.randn(8, 5),)
    with pytest.raises(SiteError, match="mixes units"):
        Widen("fc1", to=12)(model, inputs)


class Statement(nn.Module):
    """An in-place activation written as a statement: its result node has no reader, and
    ``fc2`` reads ``fc1``'s tensor, which the activation changed in place."""

    def __init__(self, form: str):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2, self.form = nn.Linear(5, 6), nn.Linear(6, 3), form

    def forward(self, x):
        h = self.fc1(x)
        if self.form == "functional":
            F.relu(h, inplace=True)
        else:
            h.relu_()
        return self.fc2(h)


@pytest.mark.parametrize("form", ["functional", "method"])
def test_deepen_is_not_offered_after_an_in_place_activation_nothing_reads(form):
    """``F.relu(h, inplace=True)`` as a statement was a deepening point: the block went after a
    node nothing reads, so it could never change the function (a dead block that trains
    nothing). Now it is not offered, and asking for it is a SiteError that says why."""
    model, inputs = Statement(form), (torch.randn(4, 5),)
    gm = private_copy(model, inputs)
    (node,) = [n.name for n in gm.graph.nodes if n.op in ("call_function", "call_method")]
    assert node not in deepen_points(gm)
    with pytest.raises(SiteError, match="nothing reads"):
        Deepen(at=node)(model, inputs)


class InPlaceShared(nn.Module):
    """``F.relu(h, inplace=True)`` whose input ``h`` is read again afterwards."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2, self.fc3 = nn.Linear(5, 6), nn.Linear(6, 3), nn.Linear(6, 3)

    def forward(self, x):
        h = self.fc1(x)
        y = F.relu(h, inplace=True)
        return self.fc2(y) + self.fc3(h)


def test_deepen_refuses_an_in_place_activation_whose_input_is_read_elsewhere():
    """The block would sit on one of the two readers of the same tensor only."""
    model, inputs = InPlaceShared(), (torch.randn(4, 5),)
    gm = private_copy(model, inputs)
    assert "relu" not in deepen_points(gm)
    with pytest.raises(SiteError, match="in place"):
        Deepen(at="relu")(model, inputs)


@pytest.mark.parametrize("make", [lambda: Widen("fc1", to=9), lambda: Deepen(),
                                  lambda: morphc.space.moves.Grow(sites="all", width=2)])
def test_moves_made_inside_inference_mode_give_a_model_that_trains(make):
    """A move (or a ModelSpace) made inside ``torch.inference_mode()`` copied the weights into
    inference tensors: the new architecture could not take one training step."""
    model, inputs = Between(torch.tanh), (torch.randn(4, 5),)
    with torch.inference_mode():
        moved = make()(model, inputs)
        space = morphc.ModelSpace(model, inputs)
    for module in (moved, space.module()):
        assert not any(t.is_inference() for t in [*module.parameters(), *module.buffers()])
        module(*inputs).sum().backward()


class Resampling(nn.Module):
    """Parameter-free modules a vision or tabular model uses besides the common activations:
    padding, pixel shuffles, resampling, LRN, LP pooling, GLU, shrinks and SELU-type units."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.pad, self.conv = nn.ReflectionPad2d(1), nn.Conv2d(4, 8, 3)
        self.act, self.glu = nn.SELU(), nn.GLU(1)
        self.up, self.shuffle = nn.PixelShuffle(2), nn.ChannelShuffle(1)
        self.zero, self.circ = nn.ZeroPad2d((1, 0, 1, 0)), nn.CircularPad2d(1)
        self.lrn, self.lp = nn.LocalResponseNorm(2), nn.LPPool2d(2, 2)
        self.resize = nn.Upsample(scale_factor=2, mode="bilinear")
        self.units = nn.Sequential(nn.CELU(0.5), nn.Softsign(), nn.LogSigmoid(),
                                   nn.Tanhshrink(), nn.Softshrink(0.2), nn.Hardshrink(0.1),
                                   nn.Threshold(-0.5, 0.0), nn.RReLU(), nn.AlphaDropout(0.1),
                                   nn.Softmin(1))
        self.fc = nn.Linear(1, 2)

    def forward(self, x):
        h = self.glu(self.act(self.conv(self.pad(x))))          # 8 → 4 channels
        h = self.lp(self.lrn(self.circ(self.zero(self.shuffle(self.up(h))))))
        return self.fc(self.units(self.resize(h)).mean((1, 2, 3)).unsqueeze(-1))


def test_models_with_more_parameter_free_modules_save_and_load(tmp_path):
    """``morphc.save`` refused any graph with nn.SELU, nn.GLU, a padding or a pixel shuffle:
    their classes were missing from the allow-list of modules a file may rebuild."""
    model, inputs = Resampling().eval(), (torch.randn(2, 4, 6, 6),)
    gm = private_copy(model, inputs)
    morphc.save(gm, tmp_path / "m")
    back = morphc.load(tmp_path / "m")
    assert [type(m) for m in back.modules()][1:] == [type(m) for m in gm.modules()][1:]
    assert torch.equal(outputs(back, inputs), outputs(model, inputs))


class Transposed(nn.Module):
    """A Linear embedding turned channels-first for a Conv1d (TCN / conformer front):
    ``gelu`` reads an (N, C, L) tensor whose producer site is a Linear."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.conv, self.head = nn.Linear(4, 6), nn.Conv1d(6, 6, 3, padding=1), \
            nn.Linear(6, 2)

    def forward(self, x):                                   # x: (N, L, 4)
        h = F.gelu(self.emb(x).transpose(1, 2))             # (N, 6, L)
        return self.head(torch.relu(self.conv(h)).mean(-1))


def test_deepen_does_not_read_a_layout_through_a_transpose():
    """Deepen looked past the transpose to the Linear and built a block over the last axis,
    which is the sequence here: a Linear(L, L) that mixed time steps and refused every other
    length. Past a transpose the layout is unknown: the point is not offered, and asking for it
    says to pass ``kind``; with ``kind="conv"`` the block reads the channels."""
    model, inputs = Transposed(), (torch.randn(2, 7, 4),)
    gm = private_copy(model, inputs)
    assert deepen_points(gm) == ["relu"]
    with pytest.raises(SiteError, match="kind="):
        Deepen(at="gelu")(model, inputs)
    deep = Deepen(at="gelu", kind="conv")(model, inputs)
    other = torch.randn(3, 9, 4)
    assert torch.equal(outputs(deep, (other,)), outputs(model, (other,)))


class ConvNeXtBlock(nn.Module):
    """A ConvNeXt block: depthwise conv, then LayerNorm and two Linear layers on (N, H, W, C)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.dw = nn.Conv2d(4, 4, 7, padding=3, groups=4)
        self.norm, self.up, self.down = nn.LayerNorm(4), nn.Linear(4, 16), nn.Linear(16, 4)

    def forward(self, x):
        h = self.dw(x).permute(0, 2, 3, 1)
        h = self.down(F.gelu(self.up(self.norm(h))))
        return x + h.permute(0, 3, 1, 2)


def test_deepen_in_a_channels_last_block_acts_on_the_features():
    """Deepen took every rank-4 tensor as (N, C, H, W): after a ConvNeXt block's Linear it
    built a 3×3 conv with H as channels, which mixed rows and refused every other height. The
    Linear that produced the tensor now says the features are last."""
    model, inputs = ConvNeXtBlock(), (torch.randn(2, 4, 5, 6),)
    gm = private_copy(model, inputs)
    assert "gelu" in deepen_points(gm)
    deep = Deepen(at="gelu")(model, inputs)
    block = next(m for m in deep.modules() if isinstance(m, morphc.ir.branch.BypassBranch))
    assert (block.kind, block.in_features) == ("linear", 16)
    other = (torch.randn(3, 4, 8, 7),)
    assert torch.equal(outputs(deep, other), outputs(model, other))


class LeNet(nn.Module):
    """The tutorial CNN: its classifier reads ``x.view(x.size(0), -1)`` (or a variant)."""

    def __init__(self, form: str):
        super().__init__()
        torch.manual_seed(0)
        self.c1, self.c2 = nn.Conv2d(1, 6, 5), nn.Conv2d(6, 16, 5)
        self.f1, self.f2, self.form = nn.Linear(16 * 4 * 4, 32), nn.Linear(32, 10), form

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.c1(x)), 2)
        x = F.max_pool2d(F.relu(self.c2(x)), 2)
        if self.form == "view-size":
            x = x.view(x.size(0), -1)
        elif self.form == "reshape-shape":
            x = x.reshape(x.shape[0], -1)
        elif self.form == "view-tuple":
            x = x.view((x.size(0), -1))
        else:
            x = x.view(-1, 16 * 4 * 4)
        return self.f2(F.relu(self.f1(x)))


@pytest.mark.parametrize("form", ["view-size", "reshape-shape", "view-tuple"])
def test_widen_a_conv_whose_output_a_classifier_views_flat(form):
    """``x.view(x.size(0), -1)`` before the classifier stopped Widen at the conv before it
    ("used by 2 nodes": the size read counted as a use). It flattens the units and every dim
    after them, so it is a flatten: the classifier's columns are split per copied channel."""
    model = LeNet(form).double()
    inputs = (torch.randn(3, 1, 28, 28, dtype=torch.float64),)
    assert ("c2", "f1") in widenable_pairs(private_copy(model, inputs))
    wide = Widen("c2", to=21)(model, inputs)
    assert wide.get_submodule("f1").in_features == 21 * 4 * 4
    assert relative_change(outputs(model, inputs), outputs(wide, inputs)) <= 1e-12
    other = (torch.randn(5, 1, 28, 28, dtype=torch.float64),)
    assert relative_change(outputs(model, other), outputs(wide, other)) <= 1e-12


def test_a_view_to_constant_sizes_still_stops_widening():
    """``x.view(-1, 256)`` would not fit the wider tensor: refused, typed, before any change."""
    model, inputs = LeNet("view-constant"), (torch.randn(3, 1, 28, 28),)
    assert ("c2", "f1") not in widenable_pairs(private_copy(model, inputs))
    with pytest.raises(SiteError, match="mixes units"):
        Widen("c2", to=21)(model, inputs)


def _flat_tail(tail: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Flatten(), tail, nn.Linear(48, 2)).double()
    with torch.no_grad():
        for value in tail.parameters():
            value.uniform_(0.1, 0.9)
        if isinstance(tail, nn.BatchNorm1d):
            tail.running_mean.uniform_(-1, 1)
            tail.running_var.uniform_(0.5, 2)
    return model.eval()


@pytest.mark.parametrize("tail", [lambda: nn.BatchNorm1d(48), lambda: nn.PReLU(48)])
def test_widen_a_conv_whose_flattened_features_a_norm_reads(tail):
    """conv → flatten → BatchNorm1d(C·H·W) → Linear was offered by widenable_pairs, and Widen
    then failed with a bare RuntimeError from ShapeProp: the norm was resized to the new unit
    count, not to its C'·H·W features. Its features are copied block-wise now."""
    model, inputs = _flat_tail(tail()), (torch.randn(4, 2, 6, 6, dtype=torch.float64),)
    assert ("0", "3") in widenable_pairs(private_copy(model, inputs))
    wide = Widen("0", to=5)(model, inputs)
    assert wide.get_submodule("3").in_features == 5 * 16
    assert relative_change(outputs(model, inputs), outputs(wide, inputs)) <= 1e-12


@pytest.mark.parametrize(("slopes", "layer"), [(1, "linear"), (6, "linear"), (6, "conv")])
def test_widen_passes_through_prelu(slopes, layer):
    """PReLU stopped widening ("mixes units"); its slope is shared (1) or one per unit on
    dim 1, which the widening copies like a BatchNorm's affine."""
    torch.manual_seed(0)
    if layer == "linear":
        model = nn.Sequential(nn.Linear(4, 6), nn.PReLU(slopes), nn.Linear(6, 2))
        inputs = (torch.randn(5, 4, dtype=torch.float64),)
    else:
        model = nn.Sequential(nn.Conv2d(2, 6, 3), nn.PReLU(slopes), nn.Conv2d(6, 2, 1))
        inputs = (torch.randn(5, 2, 6, 6, dtype=torch.float64),)
    model = model.double()
    with torch.no_grad():
        model[1].weight.uniform_(0.0, 0.5)
    wide = Widen("0", to=9)(model, inputs)
    assert wide.get_submodule("1").weight.numel() == (1 if slopes == 1 else 9)
    assert relative_change(outputs(model, inputs), outputs(wide, inputs)) <= 1e-12


def test_a_move_that_builds_a_graph_its_inputs_cannot_run_is_a_move_error(monkeypatch):
    """The last check of every move runs the new graph on the example inputs; when a pass
    builds one that does not run (as Widen did after a flatten), the user got torch's bare
    RuntimeError from ShapeProp, which ModelSpace.apply and the search do not catch."""
    import morphc.passes.widen_layer as widen_pass

    def too_narrow(module, index, split, block):      # a broken widen_in: columns not widened
        return module

    monkeypatch.setattr(widen_pass, "widen_in", too_narrow)
    model, inputs = Between(torch.tanh), (torch.randn(4, 5),)
    with pytest.raises(morphc.MoveError, match="fails on the example inputs"):
        Widen("fc1", to=9)(model, inputs)
    space = morphc.ModelSpace(model, inputs)
    with pytest.raises(morphc.MoveError):
        space.apply(Widen("fc1", to=9))
    assert space.graph.number_of_nodes() == 1
