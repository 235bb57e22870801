"""The ``morphc`` command: inspect a model's graph, draw it, run the demo or the benchmark.

    morphc inspect morphc.zoo:cnn_bn --extend --sites all --html graph.html
    morphc inspect mypkg.models:make_net --input-shape 1,3,32,32 --svg net.svg --json net.json
    morphc demo --quick
    morphc bench --help

Exit status: 0 on success, 2 on a usage error (bad options), 1 when the work itself fails. Errors
are one line on stderr, ``morphc: error: ...``, saying what to do; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import inspect
import io
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

PROG = "morphc"
PASSTHROUGH = ("demo", "bench")  # subcommands that parse their own arguments


class CLIError(Exception):
    """A failure to report as one line (exit 1); the message says what to do."""


# ---------------------------------------------------------------------------------------------
# argument parsing


def parse_shape(text: str) -> tuple[int, ...]:
    """``"1,3,32,32"`` → ``(1, 3, 32, 32)``; every dimension a positive int."""
    parts = [p.strip() for p in text.replace("x", ",").split(",")]
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        shape = ()
    if not shape or any(d <= 0 for d in shape):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a shape; write positive integers separated by commas, "
            "e.g. --input-shape 1,3,32,32")
    return shape


def parse_dtype(text: str):
    import torch

    dtype = getattr(torch, text.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a torch dtype; use e.g. float32, float64, bfloat16, int64")
    return dtype


def parse_width(text: str) -> int | float:
    try:
        value = float(text) if any(c in text for c in ".eE") else int(text)
    except ValueError:
        value = 0
    if value <= 0 or (isinstance(value, float) and value > 1):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a width; give a unit count (e.g. 8) or a fraction in (0, 1] "
            "of each site's output size (e.g. 0.25)")
    return value


def parse_sites(text: str):
    """``all`` / ``auto`` / a comma-separated list of site names or patterns."""
    if text in ("all", "auto"):
        return text
    names = [s.strip() for s in text.split(",") if s.strip()]
    if not names:
        raise argparse.ArgumentTypeError("give 'all', 'auto' or comma-separated site names")
    return names


def _add_inspect(subparsers, debug: argparse.ArgumentParser) -> None:
    p = subparsers.add_parser(
        "inspect", parents=[debug], help="show the sites of a model; draw its graph",
        description="Trace a model, list its extension sites (shapes, parameters, FLOPs) and "
        "optionally extend it and draw the original and extended graphs side by side. "
        "The model is put in eval mode.",
        epilog="FACTORY is 'package.module:name' (imported, never evaluated). name may be an "
        "nn.Module, a callable returning one, or a callable returning (model, example_inputs) "
        "like morphc.zoo:cnn_bn. Example: morphc inspect morphc.zoo:mlp --extend --sites all "
        "--html mlp.html")
    p.add_argument("factory", metavar="FACTORY", help="package.module:name of the model")
    p.add_argument("--input-shape", type=parse_shape, action="append", metavar="SHAPE",
                   help="shape of a random example input, e.g. 1,3,32,32 (repeat for several "
                   "inputs; default: the inputs the factory returned)")
    p.add_argument("--input-dtype", type=parse_dtype, default=None, metavar="DTYPE",
                   help="dtype of the inputs (default float32); a floating DTYPE converts the "
                   "model too; integer dtypes draw 0/1 (e.g. token ids)")
    ext = p.add_argument_group("extension")
    ext.add_argument("--extend", action="store_true",
                     help="also extend the model and show original vs extended")
    ext.add_argument("--sites", type=parse_sites, default="all", metavar="SITES",
                     help="all (default), auto, or comma-separated site names")
    ext.add_argument("--width", type=parse_width, default=8, metavar="K",
                     help="branch width: units (default 8) or a fraction in (0, 1]")
    ext.add_argument("--activation", default="tanh", metavar="FAMILY",
                     help="activation family of the branches (default tanh)")
    out = p.add_argument_group("outputs (files)")
    out.add_argument("--json", metavar="FILE", help="the report as JSON")
    out.add_argument("--dot", metavar="FILE", help="the graph(s) as Graphviz DOT")
    out.add_argument("--svg", metavar="FILE",
                     help="the graph(s) as SVG (Graphviz when installed, else built-in layout)")
    out.add_argument("--png", metavar="FILE", help="the graph(s) as PNG (needs Graphviz)")
    out.add_argument("--html", metavar="FILE",
                     help="one self-contained HTML page: graphs side by side and the report")
    p.set_defaults(run=run_inspect, parser=p)


def build_parser() -> argparse.ArgumentParser:
    from morphc import __version__

    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show the full traceback on errors")
    parser = argparse.ArgumentParser(
        prog=PROG, description="morphc: a model-morphism compiler for PyTorch.",
        epilog="Run 'morphc COMMAND --help' for the options of a command.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback on errors")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_inspect(subparsers, debug)
    subparsers.add_parser("demo", add_help=False, help="run the Bypass demo "
                          "(morphc demo --help for its options)")
    subparsers.add_parser("bench", add_help=False, help="run the benchmarks "
                          "(morphc bench --help for its options)")
    return parser


# ---------------------------------------------------------------------------------------------
# loading a model


@dataclass
class Loaded:
    model: object
    inputs: tuple | None
    label: str


def _import_module(module_name: str, spec: str):
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())  # like `python -m`: models in the current directory
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and (module_name == e.name or module_name.startswith(e.name + ".")):
            raise CLIError(f"cannot import module {module_name!r} (from {spec!r}): no module "
                           f"named {e.name!r}; check the spelling, run from the directory that "
                           "contains it, or add it to PYTHONPATH") from e
        raise CLIError(f"importing {module_name!r} failed: it needs {e.name!r}, which is not "
                       f"installed; install it (pip install ...) and retry") from e
    except Exception as e:
        raise CLIError(f"importing {module_name!r} failed: {type(e).__name__}: "
                       f"{_one_line(e)}; fix the module (run with --debug for the traceback)"
                       ) from e


def _call_factory(obj, spec: str):
    try:
        inspect.signature(obj).bind()
    except TypeError as e:
        raise CLIError(f"{spec} cannot be called without arguments ({_one_line(e)}); give its "
                       "parameters defaults or point at a factory that needs none") from e
    except ValueError:
        pass  # no signature (some builtins): just try the call
    try:
        return obj()
    except Exception as e:
        raise CLIError(f"calling {spec}() failed: {type(e).__name__}: {_one_line(e)}; "
                       "run with --debug for the traceback") from e


def load_model(spec: str) -> Loaded:
    """Resolve ``package.module:name`` to a model and, if the factory gave them, inputs."""
    from torch import nn

    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise CLIError(f"{spec!r} is not a factory path; write 'package.module:name', "
                       "e.g. morphc.zoo:cnn_bn or mypkg.models:make_model")
    module = _import_module(module_name, spec)
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            public = sorted(n for n in dir(module) if not n.startswith("_"))[:12]
            raise CLIError(f"module {module_name!r} has no attribute {attr!r}; "
                           f"available: {', '.join(public) or 'nothing public'}")
        obj = getattr(obj, part)
    if isinstance(obj, nn.Module):
        return Loaded(obj, None, spec)
    if not callable(obj):
        raise CLIError(f"{spec} is a {type(obj).__name__}, not an nn.Module or a callable "
                       "returning one; point at a model factory")
    result = _call_factory(obj, spec)
    if isinstance(result, nn.Module):
        return Loaded(result, None, spec)
    if isinstance(result, tuple | list) and len(result) == 2 and \
            isinstance(result[0], nn.Module):
        inputs = result[1]
        inputs = tuple(inputs) if isinstance(inputs, tuple | list) else (inputs,)
        return Loaded(result[0], inputs, spec)
    raise CLIError(f"{spec}() returned a {type(result).__name__}; it must return an nn.Module "
                   "or a (model, example_inputs) pair")


def make_inputs(shapes, dtype, loaded: Loaded) -> tuple:
    import torch

    if not shapes:
        if loaded.inputs is None:
            raise CLIError(f"{loaded.label} gave no example inputs; pass --input-shape, "
                           "e.g. --input-shape 1,3,32,32")
        if dtype is None:
            return loaded.inputs
        return tuple(t.to(dtype) if isinstance(t, torch.Tensor) else t for t in loaded.inputs)
    dtype = dtype or torch.float32
    generator = torch.Generator().manual_seed(0)
    if dtype.is_floating_point or dtype.is_complex:
        return tuple(torch.randn(s, dtype=dtype, generator=generator) for s in shapes)
    return tuple(torch.randint(0, 2, s, generator=generator).to(dtype) for s in shapes)


def _describe(inputs: tuple) -> str:
    return ", ".join(f"{tuple(t.shape)} {str(t.dtype).removeprefix('torch.')}"
                     if hasattr(t, "shape") else type(t).__name__ for t in inputs)


def check_runs(model, inputs: tuple, label: str) -> None:
    """Run the model once so a shape mismatch is reported as such, not as a trace failure."""
    import torch

    try:
        with torch.no_grad():
            model(*inputs)
    except Exception as e:
        raise CLIError(f"{label} fails on inputs {_describe(inputs)}: {type(e).__name__}: "
                       f"{_one_line(e)}; pass an --input-shape (and --input-dtype) the model "
                       "accepts") from e


# ---------------------------------------------------------------------------------------------
# inspect


class _BelowError(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR


@contextlib.contextmanager
def quiet_tracing(enabled: bool = True):
    """Hold back what tracing prints on stderr (torch.export dumps partial graphs and warns on
    failure) so a failure reads as one line; replayed if the block succeeds. Torch log records
    below ERROR are dropped. ``--debug`` turns this off."""
    if not enabled:
        yield
        return
    manager = logging.Logger.manager
    handlers = {h for name, logger in list(manager.loggerDict.items())
                if name.split(".")[0] == "torch" and isinstance(logger, logging.Logger)
                for h in logger.handlers}
    noise, held = _BelowError(), io.StringIO()
    for handler in handlers:
        handler.addFilter(noise)
    try:
        with contextlib.redirect_stderr(held):
            yield
    finally:
        for handler in handlers:
            handler.removeFilter(noise)
    sys.stderr.write(held.getvalue())


def _write(path: str, text: str | None = None, writer=None) -> None:
    target = Path(path)
    try:
        if target.parent != Path("."):
            target.parent.mkdir(parents=True, exist_ok=True)
        if writer is not None:
            writer(target)
        else:
            target.write_text(text, encoding="utf-8")
    except OSError as e:
        raise CLIError(f"cannot write {path}: {e.strerror or e}; choose a writable path") from e
    print(f"wrote {path}")


def _pictures(args, graphs: list, labels: tuple[str, ...], title: str, report_text: str,
              reports: list):
    from morphc.tools import pictures as viz

    if args.dot or args.svg or args.png:
        dot = viz.to_dot(graphs[0], title=title) if len(graphs) == 1 else \
            viz.side_by_side_dot(graphs[0], graphs[1], labels=labels)
        if args.dot:
            _write(args.dot, dot)
        if args.svg:
            if viz.graphviz_available():
                _write(args.svg, writer=lambda p: viz.render(dot, p))
            else:
                print("note: Graphviz 'dot' not found; drawing the SVG with the built-in layout",
                      file=sys.stderr)
                _write(args.svg, viz.to_svg(graphs[0], title=title) if len(graphs) == 1 else
                       viz.side_by_side_svg(graphs[0], graphs[1], labels=labels))
        if args.png:
            _write(args.png, writer=lambda p: viz.render(dot, p))
    if args.html:
        _write(args.html, writer=lambda p: viz.write_html(
            p, graphs[0], graphs[1] if len(graphs) > 1 else None, title=title,
            labels=labels, report_text=report_text, reports=reports))


def run_inspect(args) -> int:
    import morphc
    from morphc.tools import graph_diff

    loaded = load_model(args.factory)
    model = loaded.model
    inputs = make_inputs(args.input_shape, args.input_dtype, loaded)
    if args.input_dtype is not None and args.input_dtype.is_floating_point:
        model.to(args.input_dtype)
    model.eval()
    check_runs(model, inputs, args.factory)
    with quiet_tracing(not args.debug):
        report = morphc.inspect(model, inputs)
    print(report)
    data = report.to_dict()
    graphs, labels, reports = [report.graph_module], ("original",), [report]
    text = str(report)
    if args.extend:
        with quiet_tracing(not args.debug):
            ext = morphc.extend(model, inputs, sites=args.sites, width=args.width,
                                activation=args.activation)
        ext_report = morphc.inspect(ext)
        diff = graph_diff.diff_graphs(ext.traced.graph_module, ext.graph_module)
        deviation = graph_diff.measure_deviation(model, ext, inputs)
        summary = f"max relative deviation, original vs extended: {deviation:.3g}"
        print(f"\n{ext_report}\n\n{diff}\n{summary}")
        graphs, labels = [ext.traced.graph_module, ext.graph_module], ("original", "extended")
        reports.append(ext_report)
        text = f"{report}\n\n{ext_report}\n\n{diff}\n{summary}"
        data = {**data, "extended_report": ext_report.to_dict(), "graph_diff": diff.to_dict(),
                "deviation": deviation}
    if args.json:
        import json

        _write(args.json, json.dumps(data, indent=2, default=str))
    _pictures(args, graphs, labels, f"morphc inspect {args.factory}", text, reports)
    return 0


# ---------------------------------------------------------------------------------------------
# entry point


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text if len(text) <= 700 else text[:697] + "..."


def _error(message: str) -> None:
    print(f"{PROG}: error: {message}", file=sys.stderr)


def _passthrough(command: str, rest: list[str]) -> int:
    module = {"demo": "morphc.tools.demo", "bench": "morphc.bench.cli"}[command]
    try:
        entry = importlib.import_module(module).main
    except (ImportError, AttributeError) as e:
        raise CLIError(f"'morphc {command}' is not available in this install ({module}: "
                       f"{_one_line(e)}); reinstall morphc (pip install -e .)") from e
    return int(entry(rest) or 0)


def _run(args, extras: list[str]) -> int:
    if args.command in PASSTHROUGH:
        return _passthrough(args.command, extras)
    return args.run(args)


def main(argv: list[str] | None = None) -> int:
    """Run the ``morphc`` command line; return the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, extras = parser.parse_known_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    if extras and args.command not in PASSTHROUGH:
        args.parser.error(f"unrecognized arguments: {' '.join(extras)}")  # exit 2
    args.debug = getattr(args, "debug", False) or os.environ.get("MORPHC_DEBUG") == "1"
    try:
        return _run(args, extras)
    except KeyboardInterrupt:
        _error("interrupted")
        return 130
    except Exception as e:
        if args.debug:
            raise
        _error(_message(e))
        return 1


def _message(error: Exception) -> str:
    from morphc.errors import MorphcError, TraceError

    if isinstance(error, CLIError):
        return _one_line(error)
    if isinstance(error, TraceError):
        return f"cannot trace the model: {_one_line(error)}"
    if isinstance(error, MorphcError):
        return _one_line(error)
    return (f"{type(error).__name__}: {_one_line(error)} (unexpected; rerun with --debug for "
            "the traceback and report it)")


if __name__ == "__main__":
    sys.exit(main())
