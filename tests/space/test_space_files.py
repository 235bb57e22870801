"""A saved ModelSpace loads back (``ModelSpace.load``), and its files are data.

Before: ``space.save(directory, weights="all")`` wrote every node's architecture and weights,
but nothing read a space back — a NAS-style user could restore one architecture at a time
(``morphc.load``) and lost the graph of moves, the scores and which node was best. Each test
failed before (no ``ModelSpace.load``)."""

from __future__ import annotations

import copy
import hashlib
import json
import pickle
import shutil

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import morphc
from morphc.space.schema import _canonical


def _train(x, y):
    def train(module, steps):
        opt = torch.optim.SGD(module.parameters(), lr=0.05)
        for _ in range(steps):
            opt.zero_grad()
            F.mse_loss(module(x), y).backward()
            opt.step()
    return train


def _space():
    """Root, a widened child, an extended (trained, off C) and a grown one, each trained and
    scored; one refused move."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    x, y = torch.randn(32, 4), torch.randn(32, 1)
    space = morphc.ModelSpace(model, (x,))
    wide = space.apply(morphc.Widen("0", to=12))
    extended = space.apply(morphc.Extend(sites="all", width=2), wide)
    grown = space.apply(morphc.Grow(sites="all", width=2), wide)
    with pytest.raises(morphc.MoveError):
        space.apply(morphc.Contract(), wide)
    train = _train(x, y)
    for steps, node in enumerate((space.root, wide, extended, grown), start=2):
        space.train(node, train, steps)
        space.evaluate(node, lambda m: -float(F.mse_loss(m(x), y).detach()))
    return space, x, (wide, extended, grown)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """One space, saved with every node (building one takes seconds): tests copy the files."""
    space, x, nodes = _space()
    directory = tmp_path_factory.mktemp("space")
    space.save(directory, weights="all")
    return space, x, nodes, directory


def _copy(saved, tmp_path):
    space, x, nodes, directory = saved
    shutil.copytree(directory, tmp_path, dirs_exist_ok=True)
    return space, x, nodes


def test_a_space_saved_with_every_node_loads_back_as_it_was(saved, tmp_path):
    space, x, (_, extended, _) = _copy(saved, tmp_path)
    loaded = morphc.ModelSpace.load(tmp_path, (x,))
    assert list(loaded.graph.nodes) == list(space.graph.nodes) and loaded.root == space.root
    assert loaded.to_json() == space.to_json()         # scores, moves, refusals, architectures
    assert loaded.best()[0] == space.best()[0] and loaded.best()[2] == space.best()[2]
    assert torch.equal(loaded.best()[1](x), space.best()[1](x))
    for node in space.graph.nodes:
        before, after = space.module(node), loaded.module(node)
        assert isinstance(after, morphc.ExtendedModel) == isinstance(before, morphc.ExtendedModel)
        assert torch.equal(after(x), before(x)) and after.training == before.training
    ext = loaded.module(extended)
    assert isinstance(ext, morphc.ExtendedModel) and ext.homotopy == 1.0
    assert ext.constraint_residual() > 0                 # its trained branches came back
    # the loaded space goes on as the saved one does: the same move reaches the same node
    original = copy.deepcopy(space)
    for s in (original, loaded):
        s.module(extended).set_homotopy(0.0)
    contracted = loaded.apply(morphc.Contract(), extended)
    assert contracted == original.apply(morphc.Contract(), extended)
    assert torch.equal(loaded.module(contracted)(x), original.module(contracted)(x))


def test_a_space_saved_with_the_best_weights_only_says_what_to_do(saved, tmp_path):
    space, x, _, _ = saved
    space.save(tmp_path)                                 # weights="best"
    with pytest.raises(morphc.FormatError,
                       match=r"morphc\.load\(directory / 'best'\).*weights='all'"):
        morphc.ModelSpace.load(tmp_path, (x,))
    assert isinstance(morphc.load(tmp_path / "best"), torch.fx.GraphModule)


def test_the_wrong_example_inputs_are_a_format_error_naming_them(saved, tmp_path):
    _copy(saved, tmp_path)
    with pytest.raises(morphc.FormatError, match=r"example inputs"):
        morphc.ModelSpace.load(tmp_path, (torch.randn(3, 5),))


# -- a saved space is data ----------------------------------------------------------------------
def _edit_space(tmp_path, edit):
    path = tmp_path / "space.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _edit_node(tmp_path, node, edit, weights: bytes | None = None):
    """Edit ``nodes/<node>.json`` and write digests that match: what an attacker would do."""
    path = tmp_path / "nodes" / f"{node}.json"
    data = json.loads(path.read_text())
    data.pop("digest")
    edit(data)
    if weights is not None:
        (tmp_path / "nodes" / f"{node}.pt").write_bytes(weights)
    digest = {"architecture": hashlib.sha256(_canonical(data)).hexdigest(),
              "weights": hashlib.sha256((tmp_path / "nodes" / f"{node}.pt").read_bytes())
              .hexdigest()}
    path.write_text(json.dumps({**data, "digest": digest}))


def _retarget(target):
    def edit(data):
        node = next(n for n in data["nodes"] if n["op"] == "call_module")
        node["target"] = target
    return edit


@pytest.mark.parametrize("target", ["__class__", "os.system", "0.__init__"])
def test_a_tampered_node_target_is_a_format_error(saved, tmp_path, target):
    space, x, _ = _copy(saved, tmp_path)
    _edit_node(tmp_path, space.root, _retarget(target))
    with pytest.raises(morphc.FormatError):
        morphc.ModelSpace.load(tmp_path, (x,))


def test_a_tampered_function_is_refused_by_the_allow_list(saved, tmp_path):
    space, x, _ = _copy(saved, tmp_path)

    def edit(data):
        node = next(n for n in data["nodes"] if n["op"] == "call_module")
        node.update(op="call_function", target="builtins.eval", args=[{"node": "x"}], kwargs={})
    _edit_node(tmp_path, space.root, edit)
    with pytest.raises(morphc.FormatError):
        morphc.ModelSpace.load(tmp_path, (x,))


class _Marker:
    def __reduce__(self):
        return (open, ("/tmp/morphc_space_marker_should_not_exist", "w"))


def test_a_weights_file_with_code_in_it_is_refused_unrun(saved, tmp_path):
    import os
    space, x, _ = _copy(saved, tmp_path)
    marker = "/tmp/morphc_space_marker_should_not_exist"
    if os.path.exists(marker):
        os.remove(marker)
    _edit_node(tmp_path, space.root, lambda data: None,
               weights=pickle.dumps({"0.weight": _Marker()}, protocol=2))
    with pytest.raises(morphc.FormatError, match=r"weights_only"):
        morphc.ModelSpace.load(tmp_path, (x,))
    assert not os.path.exists(marker)


@pytest.mark.parametrize("bad_id", ["../../etc/passwd", "0" * 15, "ABCDEF0123456789", 7])
def test_a_node_id_that_is_no_hash_is_refused_before_any_file_is_named(saved, tmp_path, bad_id):
    space, x, _ = _copy(saved, tmp_path)

    def edit(data):
        data["nodes"][0]["id"] = bad_id
    _edit_space(tmp_path, edit)
    with pytest.raises(morphc.FormatError, match=r"architecture hash"):
        morphc.ModelSpace.load(tmp_path, (x,))


def test_files_swapped_between_nodes_are_refused_by_the_hash(saved, tmp_path):
    space, x, (wide, _, _) = _copy(saved, tmp_path)
    for suffix in (".json", ".pt"):
        (tmp_path / "nodes" / f"{space.root}{suffix}").write_bytes(
            (tmp_path / "nodes" / f"{wide}{suffix}").read_bytes())
    with pytest.raises(morphc.FormatError, match=r"hashes to"):
        morphc.ModelSpace.load(tmp_path, (x,))


@pytest.mark.parametrize("edit,match", [
    (lambda d: d.update(extra=1), r"unknown fields \['extra'\]"),
    (lambda d: d["nodes"][0].update(steps=True), r"steps: expected int"),
    (lambda d: d["nodes"][0].update(kind="python"), r"kind"),
    (lambda d: d.update(tolerance="1e-6"), r"tolerance"),
    (lambda d: d["edges"][0].update(target="f" * 16), r"no node of the space"),
    (lambda d: d.update(version=1), r"v2"),
])
def test_space_json_fields_are_checked_strictly(saved, tmp_path, edit, match):
    _, x, _ = _copy(saved, tmp_path)
    _edit_space(tmp_path, edit)
    with pytest.raises(morphc.FormatError, match=match):
        morphc.ModelSpace.load(tmp_path, (x,))


def test_a_tampered_extend_move_is_a_format_error(saved, tmp_path):
    _, x, (_, extended, _) = _copy(saved, tmp_path)

    def edit(data):
        edge = next(e for e in data["edges"] if e["target"] == extended)
        edge["spec"]["sites"] = "__import__('os').system('true')"   # just a site name: none
    _edit_space(tmp_path, edit)
    with pytest.raises(morphc.FormatError, match=r"does not rebuild"):
        morphc.ModelSpace.load(tmp_path, (x,))


def test_nan_is_not_json(saved, tmp_path):
    _, x, _ = _copy(saved, tmp_path)
    path = tmp_path / "space.json"
    text = path.read_text()
    assert '"tolerance": 1e-06' in text
    path.write_text(text.replace('"tolerance": 1e-06', '"tolerance": NaN'))
    with pytest.raises(morphc.FormatError, match=r"NaN is not valid JSON"):
        morphc.ModelSpace.load(tmp_path, (x,))
