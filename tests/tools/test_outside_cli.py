"""Saved files and model files named the way a new user names them: ``morphc.load('model.json')``,
a ModelSpace directory, ``morphc inspect path/to/models.py:make`` and ``morphc inspect
model.json``."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch
from torch import nn

import morphc
from morphc.tools import cli

MODEL_FILE = """
import torch
from torch import nn
from sibling_width import WIDTH

def make():
    return nn.Sequential(nn.Linear(4, WIDTH), nn.ReLU(), nn.Linear(WIDTH, 2)), (torch.randn(3, 4),)
"""


def saved(tmp_path) -> tuple[nn.Module, object]:
    torch.manual_seed(0)
    space = morphc.ModelSpace(nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)),
                              (torch.randn(2, 4),))
    morphc.save(space.module(), tmp_path / "model")
    return space.module(), tmp_path / "model"


def one_line_error(capsys, *fragments: str) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("morphc: error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, err
    return err


# -- the library --------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", ["", ".json", ".pt", ".py"])
def test_load_takes_the_prefix_or_any_of_the_saved_files(tmp_path, suffix):
    module, prefix = saved(tmp_path)
    loaded = morphc.load(f"{prefix}{suffix}")
    x = torch.randn(5, 4)
    assert torch.equal(loaded(x), module(x))


def test_save_given_a_json_name_writes_the_usual_pair(tmp_path):
    module, _ = saved(tmp_path)
    paths = morphc.save(module, tmp_path / "other.json")
    assert sorted(p.name for p in paths.values()) == ["other.json", "other.pt", "other.py"]
    assert isinstance(morphc.load(tmp_path / "other.json"), torch.fx.GraphModule)


def test_a_missing_weights_file_is_a_format_error_that_says_so(tmp_path):
    _, prefix = saved(tmp_path)
    os.remove(f"{prefix}.pt")
    with pytest.raises(morphc.FormatError, match="no weights file next to it"):
        morphc.load(prefix)


def test_a_space_directory_is_pointed_at_its_best_architecture(tmp_path):
    space = morphc.ModelSpace(nn.Sequential(nn.Linear(4, 2)), (torch.randn(2, 4),))
    space.evaluate(space.root, lambda module: 1.0)
    space.save(tmp_path / "space")
    with pytest.raises(FileNotFoundError, match="saved ModelSpace.*best"):
        morphc.load(tmp_path / "space")
    assert isinstance(morphc.load(tmp_path / "space" / "best"), torch.fx.GraphModule)


# -- the command line ---------------------------------------------------------------------------
def test_inspect_a_model_file_by_path(tmp_path, capsys, monkeypatch):
    """``path/to/models.py:make`` is what users type; its sibling imports must work."""
    (tmp_path / "models.py").write_text(MODEL_FILE)
    (tmp_path / "sibling_width.py").write_text("WIDTH = 6\n")
    monkeypatch.chdir(tmp_path.parent)
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setattr(sys, "modules", dict(sys.modules))
    out = tmp_path / "r.json"
    assert cli.main(["inspect", f"{tmp_path / 'models.py'}:make", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [row["output_shape"] for row in rows] == [[3, 6], [3, 2]]   # WIDTH from the sibling


@pytest.mark.parametrize("spec, says", [("missing.py:make", "no file"),
                                        ("broken.py:make", "RuntimeError: boom")])
def test_a_model_file_that_is_missing_or_fails_is_one_line(tmp_path, capsys, spec, says):
    (tmp_path / "broken.py").write_text("raise RuntimeError('boom')\n")
    assert cli.main(["inspect", f"{tmp_path / spec}"]) == 1
    one_line_error(capsys, says)


def test_inspect_a_saved_architecture(tmp_path, capsys):
    _, prefix = saved(tmp_path)
    out = tmp_path / "r.json"
    assert cli.main(["inspect", f"{prefix}.json", "--input-shape", "2,4", "--extend",
                     "--json", str(out)]) == 0
    assert [row["name"] for row in json.loads(out.read_text())["rows"]] == ["0", "2"]
    capsys.readouterr()
    assert cli.main(["inspect", f"{prefix}.json"]) == 1
    one_line_error(capsys, "--input-shape")


def test_inspect_a_tampered_saved_file_is_one_line_and_runs_nothing(tmp_path, capsys):
    _, prefix = saved(tmp_path)
    doc = json.loads((tmp_path / "model.json").read_text())
    node = next(n for n in doc["nodes"] if n["op"] == "call_module")
    node["op"], node["target"] = "call_function", "os.system"
    (tmp_path / "model.json").write_text(json.dumps(doc))
    assert cli.main(["inspect", f"{prefix}.json", "--input-shape", "2,4"]) == 1
    one_line_error(capsys, "digest")
    assert cli.main(["inspect", str(tmp_path / "absent.json"), "--input-shape", "2,4"]) == 1
    one_line_error(capsys, "no saved architecture")


@pytest.mark.parametrize("option", [["--seeds", "0"], ["--steps", "-1"]])
def test_demo_refuses_counts_that_run_nothing(option, capsys):
    with pytest.raises(SystemExit) as stop:
        cli.main(["demo", "--quick", *option])
    assert stop.value.code == 2 and "must be positive" in capsys.readouterr().err


def test_demo_checks_its_output_directory_before_training(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    assert cli.main(["demo", "--quick", "--out", str(tmp_path / "file" / "out")]) == 1
    captured = capsys.readouterr()
    assert "teacher" not in captured.out, "refused before any training"
    assert captured.err.strip().splitlines() == [
        f"morphc: error: cannot write to --out {tmp_path / 'file' / 'out'}: Not a directory; "
        "choose a writable directory"]


def test_save_of_a_space_writes_its_directory_and_load_points_at_its_best(tmp_path):
    space = morphc.ModelSpace(nn.Sequential(nn.Linear(4, 2)), (torch.randn(2, 4),))
    space.evaluate(space.root, lambda module: 1.0)
    paths = morphc.save(space, tmp_path / "space")
    assert paths["json"] == tmp_path / "space" / "space.json"
    with pytest.raises(FileNotFoundError, match="morphc.load.*best"):
        morphc.load(tmp_path / "space")
    best = morphc.load(tmp_path / "space" / "best")
    x = torch.randn(3, 4)
    assert torch.equal(best(x), space.module()(x))


def test_save_takes_what_morphc_trace_returns_as_its_error_advises(tmp_path):
    model, x = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)), torch.randn(5, 4)
    with pytest.raises(morphc.FormatError, match=r"morphc.save\(morphc.trace\(model"):
        morphc.save(model, tmp_path / "plain")
    morphc.save(morphc.trace(model, (x,)), tmp_path / "traced")
    assert torch.equal(morphc.load(tmp_path / "traced")(x), model(x))
