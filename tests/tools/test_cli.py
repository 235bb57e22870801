"""The ``morphc`` command line: conventional exits, one-line errors, inspect outputs."""

import json
import shutil
import subprocess
import sys
import types
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

import morphc
from morphc.tools import cli

ROOT = Path(__file__).resolve().parents[2]
FACTORIES = "tests.cli_factories"


def run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "morphc", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=120)


def assert_one_line_error(stderr: str, *fragments: str) -> None:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("morphc: error: ") and "Traceback" not in stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


# --- as a subprocess ---------------------------------------------------------------------------

def test_help_and_version():
    top = run("--help")
    assert top.returncode == 0 and "inspect" in top.stdout and "bench" in top.stdout
    sub = run("inspect", "--help")
    assert sub.returncode == 0 and "--input-shape" in sub.stdout and "--html" in sub.stdout
    version = run("--version")
    assert version.returncode == 0 and version.stdout.strip() == f"morphc {morphc.__version__}"


@pytest.mark.parametrize("argv", [["--help"], ["inspect", "--help"], ["--version"]])
def test_help_does_not_import_torch(argv):
    """``morphc --help`` answers at once: torch (seconds to import) loads only when a command
    runs."""
    probe = ("import sys\nfrom morphc.tools.cli import main\n"
             f"try:\n    main({argv!r})\nexcept SystemExit as stop:\n    assert stop.code == 0\n"
             "heavy = sorted(m for m in ('torch', 'sympy', 'networkx') if m in sys.modules)\n"
             "assert not heavy, heavy\n")
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "usage: morphc" in done.stdout or done.stdout.startswith("morphc ")


def test_bad_factory_is_one_line_exit_1():
    done = run("inspect", "no_such_module_xyz:make", "--input-shape", "1,4")
    assert done.returncode == 1 and done.stdout == ""
    assert_one_line_error(done.stderr, "no_such_module_xyz", "PYTHONPATH")


def test_bad_shape_is_a_usage_error():
    done = run("inspect", f"{FACTORIES}:small_cnn", "--input-shape", "2,three,8")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "--input-shape" in done.stderr and "e.g. --input-shape 1,3,32,32" in done.stderr


def test_inspect_writes_json_html_dot(tmp_path):
    out = {k: tmp_path / f"g.{k}" for k in ("json", "html", "dot")}
    done = run("inspect", f"{FACTORIES}:small_cnn", "--input-shape", "2,3,8,8",
               *[a for k, p in out.items() for a in (f"--{k}", str(p))])
    assert done.returncode == 0, done.stderr
    assert "0.weight" in done.stdout and "FLOPs" in done.stdout
    data = json.loads(out["json"].read_text())
    assert [r["name"] for r in data["rows"]] == ["0", "3", "7"]
    assert data["rows"][0]["input_shape"] == [2, 3, 8, 8]
    page = out["html"].read_text()
    assert page.count("<svg") == 1 and "https://" not in page.replace(
        'xmlns="http://www.w3.org/2000/svg"', "")
    assert out["dot"].read_text().startswith("digraph morphc {")


@pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz 'dot' is not installed")
def test_inspect_extend_draws_svg_with_graphviz(tmp_path):
    svg, js = tmp_path / "g.svg", tmp_path / "g.json"
    done = run("inspect", "morphc.zoo:mlp", "--extend", "--sites", "all", "--width", "2",
               "--svg", str(svg), "--json", str(js))
    assert done.returncode == 0, done.stderr
    assert "graph diff: " in done.stdout and "+6 added" in done.stdout
    assert "original vs extended: 0" in done.stdout
    text = svg.read_text()
    ET.fromstring(text)
    assert "cluster_0" in text and "morphc_ext_0" in text   # Graphviz keeps ids as titles
    data = json.loads(js.read_text())
    assert data["extended_report"]["extended"] and data["deviation"] == 0.0
    assert len(data["graph_diff"]["added"]) == 6


# --- in process (faster): every error path ----------------------------------------------------

@pytest.mark.parametrize("factory, fragments", [
    ("tests.cli_factories", ["package.module:name"]),
    (":small_cnn", ["package.module:name"]),
    (f"{FACTORIES}:missing", ["has no attribute 'missing'", "small_cnn"]),
    (f"{FACTORIES}:not_a_model", ["not an nn.Module"]),
    (f"{FACTORIES}:returns_text", ["returned a str", "(model, example_inputs)"]),
    (f"{FACTORIES}:needs_arguments", ["without arguments"]),
    (f"{FACTORIES}:broken", ["factory exploded", "--debug"]),
    ("tests.no_such_file:x", ["cannot import module 'tests.no_such_file'"]),
])
def test_factory_errors(capsys, factory, fragments):
    assert cli.main(["inspect", factory, "--input-shape", "2,4"]) == 1
    captured = capsys.readouterr()
    assert_one_line_error(captured.err, *fragments)


def test_model_failing_on_the_shape_says_which_shape(capsys):
    assert cli.main(["inspect", f"{FACTORIES}:small_cnn", "--input-shape", "2,5,8,8"]) == 1
    assert_one_line_error(capsys.readouterr().err, "(2, 5, 8, 8)", "--input-shape")


def test_missing_inputs_and_untraceable_models(capsys):
    assert cli.main(["inspect", f"{FACTORIES}:small_cnn"]) == 1
    assert_one_line_error(capsys.readouterr().err, "pass --input-shape")
    assert cli.main(["inspect", f"{FACTORIES}:DataDependent", "--input-shape", "2,4"]) == 1
    assert_one_line_error(capsys.readouterr().err, "cannot trace", "torch.where")


def test_morphc_errors_are_one_line(capsys):
    assert cli.main(["inspect", "morphc.zoo:mlp", "--extend", "--sites", "nope"]) == 1
    assert_one_line_error(capsys.readouterr().err, "nope", "sites in this model")
    assert cli.main(["inspect", "morphc.zoo:mlp", "--extend", "--activation", "nope"]) == 1
    assert_one_line_error(capsys.readouterr().err, "nope", "register_activation")


def test_debug_shows_the_traceback():
    for argv in (["--debug", "inspect", f"{FACTORIES}:broken"],
                 ["inspect", f"{FACTORIES}:broken", "--debug"]):
        with pytest.raises(cli.CLIError, match="factory exploded") as raised:
            cli.main(argv)
        assert isinstance(raised.value.__cause__, RuntimeError), "the original is chained"


@pytest.mark.parametrize("argv", [[], ["inspect"], ["inspect", "m:f", "--no-such-option"],
                                  ["inspect", "m:f", "--width", "0"], ["frobnicate"]])
def test_usage_errors_exit_2(capsys, argv):
    with pytest.raises(SystemExit) as stop:
        code = cli.main(argv)
        raise SystemExit(code)
    assert stop.value.code == 2
    assert "usage: morphc" in capsys.readouterr().err


def test_factory_variants_and_dtype(tmp_path, capsys):
    # (model, inputs) pair: no --input-shape needed; an nn.Module instance; float64 inputs
    assert cli.main(["inspect", f"{FACTORIES}:mlp_with_inputs", "--extend", "--json",
                     str(tmp_path / "a.json")]) == 0
    data = json.loads((tmp_path / "a.json").read_text())
    assert data["rows"][0]["input_shape"] == [3, 6] and data["deviation"] == 0.0
    assert cli.main(["inspect", f"{FACTORIES}:instance", "--input-shape", "5,4",
                     "--input-dtype", "float64"]) == 0
    assert "0.weight" in capsys.readouterr().out


def test_svg_falls_back_to_the_builtin_layout_without_graphviz(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    svg = tmp_path / "out" / "g.svg"
    assert cli.main(["inspect", f"{FACTORIES}:mlp_with_inputs", "--extend", "--svg",
                     str(svg)]) == 0
    assert "built-in layout" in capsys.readouterr().err
    assert 'class="node extension"' in svg.read_text()
    assert cli.main(["inspect", f"{FACTORIES}:mlp_with_inputs", "--png",
                     str(tmp_path / "g.png")]) == 1
    assert_one_line_error(capsys.readouterr().err, "apt-get install graphviz", ".dot")


@pytest.mark.parametrize("command, module", [("demo", "morphc.tools.demo"),
                                              ("bench", "morphc.bench.cli")])
def test_demo_and_bench_get_their_arguments(monkeypatch, command, module):
    seen = []
    fake = types.ModuleType(module)
    fake.main = lambda argv: seen.append(argv) or 0
    monkeypatch.setitem(sys.modules, module, fake)
    assert cli.main([command, "--help", "--quick", "x"]) == 0
    assert seen == [["--help", "--quick", "x"]]


def test_unknown_option_is_reported_by_the_subcommand(capsys):
    with pytest.raises(SystemExit) as stop:
        cli.main(["inspect", f"{FACTORIES}:small_cnn", "--input-shape", "1,3,8,8", "--bogus"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "usage: morphc inspect" in err and "unrecognized arguments: --bogus" in err


def test_factory_keyword_inputs_and_dynamic_shapes(tmp_path, capsys):
    # (model, args, kwargs): keyword inputs reach inspect and extend
    assert cli.main(["inspect", f"{FACTORIES}:masked_with_kwargs", "--extend", "--json",
                     str(tmp_path / "k.json")]) == 0
    data = json.loads((tmp_path / "k.json").read_text())
    assert data["deviation"] == 0.0 and data["frontend"] == "symbolic_trace"
    # a mapping with dynamic_shapes: traced by torch.export with that spec, the static batch
    # reported as fixed and why
    assert cli.main(["inspect", f"{FACTORIES}:masked_with_spec", "--extend", "--json",
                     str(tmp_path / "s.json")]) == 0
    data = json.loads((tmp_path / "s.json").read_text())
    assert data["deviation"] == 0.0 and data["frontend"] == "export"
    assert any("x.size(0) fixed to 2: static in the dynamic_shapes" in s
               for s in data["specialised"])
    assert not any("size(1)" in s for s in data["specialised"])
    capsys.readouterr()
    assert cli.main(["inspect", f"{FACTORIES}:mapping_with_typo"]) == 1
    assert "unknown keys ['kwarg']" in capsys.readouterr().err
