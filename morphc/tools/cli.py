"""The ``morphc`` command: inspect a model's graph, draw it, run the demo or the benchmark.

    morphc inspect morphc.zoo:cnn_bn --extend --sites all --html graph.html
    morphc inspect mypkg.models:make_net --input-shape 1,3,32,32 --svg net.svg --json net.json
    morphc demo --quick
    morphc bench --help

Exit status: 0 on success, 2 on a usage error (bad options), 1 when the work itself fails. Errors
are one line on stderr, ``morphc: error: ...``, saying what to do; ``--debug`` shows the traceback.

The parts: :mod:`~morphc.tools.cli_args` (option types, ``CLIError``),
:mod:`~morphc.tools.model_loader` (``package.module:name`` → model and inputs),
:mod:`~morphc.tools.cli_inspect` (``morphc inspect``); ``demo`` and ``bench`` parse their own
arguments. Nothing here imports torch until a command runs, so ``morphc --help`` is instant.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from morphc.tools import cli_inspect
from morphc.tools.cli_args import CLIError, one_line

PROG = "morphc"
PASSTHROUGH = ("demo", "bench")  # subcommands that parse their own arguments


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
    cli_inspect.add_parser(subparsers, debug)
    subparsers.add_parser("demo", add_help=False, help="run the Bypass demo "
                          "(morphc demo --help for its options)")
    subparsers.add_parser("bench", add_help=False, help="run the benchmarks "
                          "(morphc bench --help for its options)")
    return parser


# ---------------------------------------------------------------------------------------------
# entry point


def _error(message: str) -> None:
    print(f"{PROG}: error: {message}", file=sys.stderr)


def _passthrough(command: str, rest: list[str]) -> int:
    module = {"demo": "morphc.tools.demo", "bench": "morphc.bench.cli"}[command]
    try:
        entry = importlib.import_module(module).main
    except (ImportError, AttributeError) as e:
        raise CLIError(f"'morphc {command}' is not available in this install ({module}: "
                       f"{one_line(e)}); reinstall morphc (pip install -e .)") from e
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
        return one_line(error)
    if isinstance(error, TraceError):
        return f"cannot trace the model: {one_line(error)}"
    if isinstance(error, MorphcError):
        return one_line(error)
    return (f"{type(error).__name__}: {one_line(error)} (unexpected; rerun with --debug for "
            "the traceback and report it)")


if __name__ == "__main__":
    sys.exit(main())
