"""Loading a user's model for the command line: ``package.module:name`` (or
``path/to/file.py:name``) → model and inputs; a file ``morphc.save`` wrote loads as data
(``morphc.load``, never run), its inputs from ``--input-shape``.

The factory is imported, never evaluated as code; it may be an ``nn.Module``, a callable
returning one, or a callable returning ``(model, example_inputs)`` (like ``morphc.zoo:cnn_bn``),
``(model, args, kwargs)``, ``(model, args, kwargs, dynamic_shapes)`` or a mapping with those keys
(``model``, ``args``, ``kwargs``, ``dynamic_shapes``) — what ``morphc.extend`` takes, so keyword
inputs and torch.export's dynamic-shape spec reach the command line as they reach the API.
Every failure is a :class:`~morphc.tools.cli_args.CLIError` saying what to do. torch is imported
inside the functions, so the command's ``--help`` stays fast.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from dataclasses import dataclass

from morphc.tools.cli_args import CLIError, one_line


@dataclass
class Loaded:
    model: object
    inputs: tuple | None
    label: str
    kwargs: dict | None = None    # keyword example inputs
    dynamic_shapes: object = None  # torch.export's spec for the inputs above


def _import_file(path: str, spec: str):
    """``path/to/models.py:name``: the file imported as a module (what ``python path/to/models.py``
    would run), its folder first on ``sys.path`` so its own sibling imports work."""
    import importlib.util

    file = os.path.abspath(path)
    if not os.path.isfile(file):
        raise CLIError(f"no file {path!r} (from {spec!r}); give an existing .py file or a "
                       "module path, e.g. mypkg.models:make_model")
    folder = os.path.dirname(file)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    name = f"morphc_user_{os.path.splitext(os.path.basename(file))[0]}"
    module_spec = importlib.util.spec_from_file_location(name, file)
    if module_spec is None or module_spec.loader is None:
        raise CLIError(f"cannot import {path!r} (from {spec!r}); give a .py file")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module          # dataclasses and pickling look the module up by name
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[name]
        raise CLIError(f"importing {path!r} failed: {type(e).__name__}: {one_line(e)}; fix the "
                       "file (run with --debug for the traceback)") from e
    return module


def _is_file_path(module_name: str) -> bool:
    return module_name.endswith(".py") or os.sep in module_name or "/" in module_name


def _saved_architecture(spec: str) -> str | None:
    """The prefix when ``spec`` names a file ``morphc.save`` wrote (``model.json`` or its
    prefix); None for a factory path."""
    if ":" in spec and not os.path.exists(spec):
        return None
    if spec.endswith((".json", ".pt")) or os.path.isfile(spec + ".json"):
        return spec
    return None


def _load_saved(prefix: str) -> Loaded:
    from morphc.space.loading import load

    try:
        return Loaded(load(prefix), None, prefix)
    except FileNotFoundError as e:
        raise CLIError(f"{one_line(e)}") from e


def _import_module(module_name: str, spec: str):
    if _is_file_path(module_name):
        return _import_file(module_name, spec)
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
                       f"{one_line(e)}; fix the module (run with --debug for the traceback)"
                       ) from e


def _call_factory(obj, spec: str):
    try:
        inspect.signature(obj).bind()
    except TypeError as e:
        raise CLIError(f"{spec} cannot be called without arguments ({one_line(e)}); give its "
                       "parameters defaults or point at a factory that needs none") from e
    except ValueError:
        pass  # no signature (some builtins): just try the call
    try:
        return obj()
    except Exception as e:
        raise CLIError(f"calling {spec}() failed: {type(e).__name__}: {one_line(e)}; "
                       "run with --debug for the traceback") from e


def load_model(spec: str) -> Loaded:
    """Resolve ``package.module:name`` (or ``path/to/file.py:name``) to a model and, if the
    factory gave them, inputs; a file ``morphc.save`` wrote (``model.json``) loads as data."""
    from torch import nn

    saved = _saved_architecture(spec)
    if saved is not None:
        return _load_saved(saved)
    module_name, sep, attr = spec.rpartition(":") if _is_file_path(spec) else spec.partition(":")
    if not sep or not module_name or not attr:
        raise CLIError(f"{spec!r} is not a factory path; write 'package.module:name' or "
                       "'path/to/file.py:name', e.g. morphc.zoo:cnn_bn or mypkg.models:make_model"
                       ", or give a file morphc.save wrote (model.json)")
    module = _import_module(module_name, spec)
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            public = sorted(n for n in dir(module) if not n.startswith("_")
                            and not inspect.ismodule(getattr(module, n)))[:20]
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
    if isinstance(result, dict) and isinstance(result.get("model"), nn.Module):
        unknown = sorted(set(result) - {"model", "args", "kwargs", "dynamic_shapes"})
        if unknown:
            raise CLIError(f"{spec}() returned a mapping with unknown keys {unknown}; allowed: "
                           "model, args, kwargs, dynamic_shapes")
        result = (result["model"], result.get("args", ()), result.get("kwargs") or {},
                  result.get("dynamic_shapes"))
    if isinstance(result, tuple | list) and 2 <= len(result) <= 4 and \
            isinstance(result[0], nn.Module) and \
            (len(result) == 2 or isinstance(result[2], dict)):
        inputs = result[1]
        inputs = tuple(inputs) if isinstance(inputs, tuple | list) else (inputs,)
        kwargs = dict(result[2]) if len(result) > 2 else None
        return Loaded(result[0], inputs, spec, kwargs, result[3] if len(result) > 3 else None)
    raise CLIError(f"{spec}() returned a {type(result).__name__}; it must return an nn.Module, "
                   "a (model, example_inputs) pair, a (model, args, kwargs[, dynamic_shapes]) "
                   "tuple or a mapping with keys model, args, kwargs, dynamic_shapes")


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


def check_runs(model, inputs: tuple, label: str, kwargs: dict | None = None) -> None:
    """Run the model once so a shape mismatch is reported as such, not as a trace failure."""
    from morphc.errors import TraceError
    from morphc.ir.example_inputs import run_example

    try:
        run_example(model, inputs, kwargs)
    except TraceError as e:
        raise CLIError(f"{label}: {one_line(e)}; pass an --input-shape (and --input-dtype) the "
                       "model accepts") from e.__cause__

