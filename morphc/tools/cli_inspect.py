"""``morphc inspect``: trace a model, list its sites, optionally extend it, draw the graphs.

    morphc inspect morphc.zoo:cnn_bn --extend --sites all --html graph.html

The options are declared by :func:`add_parser`; the work is :func:`run_inspect`, which imports
torch and the compiler only when it runs.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import sys
from pathlib import Path

from morphc.tools.cli_args import (
    CLIError,
    parse_dtype,
    parse_shape,
    parse_sites,
    parse_width,
    writable_file,
)
from morphc.tools.model_loader import check_runs, load_model, make_inputs


def add_parser(subparsers, debug: argparse.ArgumentParser) -> None:
    """Declare ``morphc inspect`` and its options on the top-level ``subparsers``."""
    p = subparsers.add_parser(
        "inspect", parents=[debug], help="show the sites of a model; draw its graph",
        description="Trace a model, list its extension sites (shapes, parameters, FLOPs) and "
        "optionally extend it and draw the original and extended graphs side by side. "
        "The model is put in eval mode.",
        epilog="FACTORY is 'package.module:name' or 'path/to/file.py:name' (imported, never "
        "evaluated), or a file morphc.save wrote (model.json: loaded as data; give "
        "--input-shape). name may be an "
        "nn.Module, a callable returning one, or a callable returning (model, example_inputs) "
        "like morphc.zoo:cnn_bn, or (model, args, kwargs[, dynamic_shapes]) for keyword inputs "
        "such as a Hugging Face model's input_ids/attention_mask/use_cache=False and "
        "torch.export's dynamic_shapes spec (or a dict with keys model, args, kwargs, "
        "dynamic_shapes). Without a spec every input dimension is traced as dynamic; the report "
        "lists those the model fixed, and why. Example: "
        "morphc inspect morphc.zoo:mlp --extend --sites all "
        "--html mlp.html")
    p.add_argument("factory", metavar="FACTORY", help="package.module:name or file.py:name of "
                   "the model, or a saved model.json")
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

    for flag in ("json", "dot", "svg", "png", "html"):   # before the model is made and traced
        if getattr(args, flag):
            writable_file(getattr(args, flag), f"--{flag}")
    loaded = load_model(args.factory)
    model = loaded.model
    inputs = make_inputs(args.input_shape, args.input_dtype, loaded)
    if args.input_dtype is not None and args.input_dtype.is_floating_point:
        model.to(args.input_dtype)
    model.eval()
    given = not args.input_shape          # --input-shape replaces the factory's inputs
    kwargs = loaded.kwargs if given else None
    dynamic_shapes = loaded.dynamic_shapes if given else None
    check_runs(model, inputs, args.factory, kwargs)
    with quiet_tracing(not args.debug):
        report = morphc.inspect(model, inputs, kwargs=kwargs, dynamic_shapes=dynamic_shapes)
    print(report)
    data = report.to_dict()
    graphs, labels, reports = [report.graph_module], ("original",), [report]
    text = str(report)
    if args.extend:
        with quiet_tracing(not args.debug):
            ext = morphc.extend(model, inputs, kwargs=kwargs, dynamic_shapes=dynamic_shapes,
                                sites=args.sites, width=args.width,
                                activation=args.activation)
        ext_report = morphc.inspect(ext)
        diff = graph_diff.diff_graphs(ext.traced.graph_module, ext.graph_module)
        deviation = graph_diff.measure_deviation(model, ext, inputs, kwargs)
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

