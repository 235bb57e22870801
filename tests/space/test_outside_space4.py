"""Outside-in checks of a NAS user restoring a model space (``ModelSpace.load``) and moving on.

Each test failed before its fix: a contracted node computed in another mode after loading,
damaged or hand-made directories raised untyped errors (or loaded, or allocated what a file
asked for), a node file linked from outside the directory was read, and an LSTM over packed
sequences could not be made a space at all."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import morphc


class _BatchNormCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.bn = nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 2)

    def forward(self, x):
        return self.fc(F.relu(self.bn(self.c1(x))).mean((2, 3)))


def test_contracting_a_loaded_extended_node_gives_what_the_saved_space_gives(tmp_path):
    """Extend the root while it trains, then score it (eval mode) and save: Contract of the
    restored extended node used to return the root in eval mode — BatchNorm then computed with
    running statistics where the saved space computed with batch statistics."""
    torch.manual_seed(0)
    x = torch.randn(4, 3, 6, 6)
    space = morphc.ModelSpace(_BatchNormCNN(), (x,))
    ext = space.apply(morphc.Extend(sites="all", width=2))
    space.evaluate(space.root, lambda m: -float(m(x).detach().pow(2).mean()))
    space.save(tmp_path, weights="all")
    loaded = morphc.ModelSpace.load(tmp_path, (x,))
    for s in (space, loaded):
        s.module(ext).train().set_homotopy(0.0)
    ours, theirs = (s.apply(morphc.Contract(), ext) for s in (loaded, space))
    assert ours == theirs
    assert loaded.module(ours).training == space.module(theirs).training == True  # noqa: E712
    assert torch.equal(loaded.module(ours)(x), space.module(theirs)(x))


# -- damaged and hand-made directories ----------------------------------------------------------
@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    x = torch.randn(6, 4)
    space = morphc.ModelSpace(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)), (x,))
    wide = space.apply(morphc.Widen("0", to=12))
    ext = space.apply(morphc.Extend(sites="all", width=2), wide)
    for node in (space.root, wide, ext):
        space.evaluate(node, lambda m: -float(m(x).detach().pow(2).mean()))
    directory = tmp_path_factory.mktemp("space")
    space.save(directory, weights="all")
    return x, {"root": space.root, "wide": wide, "ext": ext}, directory


def _load(saved, tmp_path, edit):
    x, nodes, directory = saved
    copy = tmp_path / "copy"
    shutil.copytree(directory, copy)
    edit(copy, nodes)
    return morphc.ModelSpace.load(copy, (x,))


def _json(edit):
    def apply(directory, nodes):
        path = directory / "space.json"
        data = json.loads(path.read_text())
        edit(data, nodes)
        path.write_text(json.dumps(data))
    return apply


def _text(old, new):
    def apply(directory, nodes):
        path = directory / "space.json"
        text = path.read_text()
        assert old in text
        path.write_text(text.replace(old, new, 1))
    return apply


def _remove(node, suffix):
    return lambda d, nodes: (d / "nodes" / f"{nodes[node]}{suffix}").unlink()


def _extend_edge(data, nodes):
    return next(e for e in data["edges"] if e["target"] == nodes["ext"])


@pytest.mark.parametrize("edit,match", [
    (_remove("wide", ".json"), r"nodes/\w+\.json is missing.*copy the directory"),
    (_remove("ext", ".pt"), r"nodes/\w+\.pt is missing"),
    (lambda d, n: ((d / "best.json").unlink(),), r"best weights.*best\.json is missing"),
    (lambda d, n: (_remove("wide", ".json")(d, n), (d / "nodes" / f"{n['wide']}.json").mkdir()),
     r"is missing \(or not a file\)"),
    (_text('"steps_spent": 0', '"steps_spent": ' + "9" * 5000), r"not a JSON document"),
    (_json(lambda d, n: d["nodes"][0].update(steps=10 ** 30)), r"steps: expected a count"),
    (lambda d, n: (_json(lambda data, _: data["nodes"][0].update(score=12345.5))(d, n),
                   _text("12345.5", "1" + "0" * 400)(d, n)), r"score: expected a finite"),
    (_json(lambda d, n: d.update(tolerance=-1.0)), r"tolerance: expected a finite number ≥ 0"),
    (_json(lambda d, n: _extend_edge(d, n)["spec"].update(width=10 ** 12)),
     r"does not match the saved extended architecture \(branch widths \[2\]\)"),
    (_json(lambda d, n: d["edges"].append(dict(d["edges"][0], order=7))), r"edges must be unique"),
    (_json(lambda d, n: [e.update(order=0) for e in d["edges"]]), r"edge orders must be unique"),
    (_json(lambda d, n: d["edges"][0]["spec"].update(move=1)), r"spec\.move"),
])
def test_a_damaged_saved_space_is_a_format_error_that_says_what_is_wrong(saved, tmp_path, edit,
                                                                          match):
    with pytest.raises(morphc.FormatError, match=match):
        _load(saved, tmp_path, edit)


def test_a_node_file_linked_from_outside_the_directory_is_refused(saved, tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()

    def link(directory, nodes):
        for suffix in (".json", ".pt"):
            path = directory / "nodes" / f"{nodes['wide']}{suffix}"
            shutil.move(path, outside / path.name)
            os.symlink(outside / path.name, path)
    with pytest.raises(morphc.FormatError, match=r"leads out of"):
        _load(saved, tmp_path, link)


@pytest.mark.parametrize("where", ["empty", "file", None])
def test_something_that_is_not_a_saved_space_is_a_format_error(saved, tmp_path, where):
    x, _, directory = saved
    (tmp_path / "empty").mkdir()
    path = {"empty": tmp_path / "empty", "file": directory / "space.json", None: None}[where]
    with pytest.raises(morphc.FormatError, match=r"space\.save") as error:
        morphc.ModelSpace.load(path, (x,))
    if where == "file":          # the space.json itself: name the directory to pass
        assert f"pass the directory that holds it, {directory}" in str(error.value)
    if where is not None:     # what it raised before, too
        with pytest.raises(FileNotFoundError):
            morphc.ModelSpace.load(path, (x,))


# -- models the space could not take ------------------------------------------------------------
class _PackedLSTM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp, self.lstm, self.out = nn.Linear(3, 8), nn.LSTM(8, 8, batch_first=True), \
            nn.Linear(8, 2)

    def forward(self, x, lengths):
        packed = pack_padded_sequence(torch.tanh(self.inp(x)), lengths, batch_first=True,
                                      enforce_sorted=False)
        out, _ = pad_packed_sequence(self.lstm(packed)[0], batch_first=True)
        return self.out(out.sum(1))


def test_moves_on_an_lstm_over_packed_sequences():
    """Plain ShapeProp rebuilt the PackedSequence with metadata in place of its tensors and
    failed: ModelSpace(...) said the model fails on its own example inputs."""
    torch.manual_seed(0)
    inputs = (torch.randn(4, 5, 3), torch.tensor([5, 3, 2, 4]))
    space = morphc.ModelSpace(_PackedLSTM(), inputs)
    for move in (morphc.Grow(sites=["inp"], width=2), morphc.Deepen(at="tanh")):
        node = space.apply(move)
        assert torch.allclose(space.module(node)(*inputs), space.module()(*inputs), atol=1e-6)
    ext = space.apply(morphc.Extend(sites="all", width=2))
    space.module(ext).set_homotopy(0.0)
    assert space.apply(morphc.Contract(), ext) == space.root


def test_an_extended_node_over_grown_and_deepened_branches_loads_back(tmp_path):
    """The loader took every BypassBranch in the saved graph for the extension's: with a grown
    or deepened parent, a homotopy set off 1 was "not shared" and widths differed."""
    torch.manual_seed(0)
    x = torch.randn(6, 4)
    space = morphc.ModelSpace(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)), (x,))
    parent = space.apply(morphc.Grow(sites=["0"], width=3),
                         space.apply(morphc.Deepen(at="_1")))
    ext = space.apply(morphc.Extend(sites="all", width=2), parent)
    space.module(ext).set_homotopy(0.25)
    space.save(tmp_path, weights="all")
    loaded = morphc.ModelSpace.load(tmp_path, (x,))
    assert loaded.module(ext).homotopy == 0.25
    assert torch.equal(loaded.module(ext)(x), space.module(ext)(x))


@pytest.mark.parametrize("version,advice", [(3, r"newer morphc \(v3\); upgrade morphc"),
                                            (1, r"older morphc \(v1\); save it again")])
def test_a_file_from_another_morphc_version_says_which_way_to_go(saved, tmp_path, version,
                                                                 advice):
    """Both used to say "save it with this morphc", which a file from a newer one cannot be."""
    with pytest.raises(morphc.FormatError, match=advice):
        _load(saved, tmp_path, _json(lambda d, n: d.update(version=version)))
    best = tmp_path / "copy" / "best.json"
    best.write_text(json.dumps({**json.loads(best.read_text()), "version": version}))
    with pytest.raises(morphc.FormatError, match=advice):
        morphc.load(best, check_digest=False)


def test_a_node_that_could_not_be_saved_is_named_with_its_own_error(saved, tmp_path):
    """The message quoted the root's error (None) whichever node was lost."""
    def lose(data, nodes):
        next(n for n in data["nodes"] if n["id"] == nodes["wide"])["architecture"] = {
            "error": "function f is not in the allow-list"}
    with pytest.raises(morphc.FormatError, match=r"could not be saved as data \(function f "):
        _load(saved, tmp_path, _json(lose))


def test_a_key_given_twice_is_refused_not_resolved_to_the_last(saved, tmp_path):
    """json keeps the last of two keys: a second "best" replaced the saved one silently."""
    def twice(directory, nodes):
        path = directory / "space.json"
        text = path.read_text()
        assert text.startswith("{")
        path.write_text(f'{{"best": "{nodes["root"]}", ' + text[1:])
    with pytest.raises(morphc.FormatError, match=r"\['best'\] appear twice"):
        _load(saved, tmp_path, twice)


def test_a_space_with_a_diverged_extended_node_loads_back(tmp_path):
    """NaN != NaN: the rebuilt extended node of a diverged run 'did not compute what was
    saved', so one diverged child made the whole space unloadable."""
    torch.manual_seed(0)
    x = torch.randn(6, 4)
    space = morphc.ModelSpace(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)), (x,))
    ext = space.apply(morphc.Extend(sites="all", width=2))
    with torch.no_grad():
        space.module(ext).graph_module.get_parameter("morphc_ext.2.B").fill_(float("nan"))
    space.save(tmp_path, weights="all")
    out = morphc.ModelSpace.load(tmp_path, (x,)).module(ext)(x)
    assert out.isnan().all() and out.shape == (6, 3)


@pytest.mark.parametrize("key,value", [("params", 1), ("summary", "L4-800 relu L800-3")])
def test_node_facts_in_space_json_must_match_the_architecture(saved, tmp_path, key, value):
    """params and summary were taken from space.json as written: an edited file gave a loaded
    space that reported another architecture than the one it held."""
    with pytest.raises(morphc.FormatError, match=rf"space\.json says {key}"):
        _load(saved, tmp_path, _json(lambda d, n: d["nodes"][0].update({key: value})))
