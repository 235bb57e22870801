"""The settings of torch's own layers (``Dropout.p``, ``LeakyReLU.negative_slope``,
``BatchNorm.momentum``), which a user may change between steps (a dropout schedule), and which a
graph may or may not have baked in.

torch.export writes them into the graph as numbers (``aten.dropout(x, 0.3, True)``); a
symbolically traced graph calls such a layer as a ``call_module`` and reads them live, unless it
traced through the layer. So a trace depends on them (:func:`module_settings` is part of
:func:`morphc.ir.trace.trace`'s cache key), and what has to happen when one changes depends on
whether the graph reads that layer live (:func:`live_modules`).
"""

from __future__ import annotations

from torch import fx, nn

Settings = dict[str, tuple]


def setting_names(module: nn.Module) -> tuple[str, ...]:
    """The plain number, bool and string attributes of one of torch's own layers (not
    ``training``: modes are compared apart); () for any other module, whose forward may count
    its calls in such an attribute."""
    if not type(module).__module__.startswith("torch.nn."):
        return ()
    return tuple(k for k, v in vars(module).items()
                 if not k.startswith("_") and k != "training" and
                 isinstance(v, bool | int | float | str))


def module_settings(model: nn.Module) -> Settings:
    """``{module name: ((attribute, value), ...)}`` over the layers that have settings."""
    return {name: tuple((k, vars(module)[k]) for k in names)
            for name, module in model.named_modules() if (names := setting_names(module))}


class SettingsWatch:
    """The settings of a model's layers, read on every step of a cycle: which attributes are
    settings is found once (a walk over every attribute of every layer costs 1.5 ms a step on a
    12-layer TransformerEncoder), then :meth:`read` is one lookup each."""

    def __init__(self, model: nn.Module) -> None:
        self.keys = [(name, module, key) for name, module in model.named_modules()
                     for key in setting_names(module)]

    def read(self) -> tuple:
        return tuple(vars(module).get(key) for _, module, key in self.keys)

    def changed(self, before: tuple, now: tuple) -> list[tuple[str, str]]:
        """``(module name, "name.attribute before → now")`` for each setting that differs."""
        return [(name, f"{name + '.' if name else ''}{key} {old!r} → {new!r}")
                for (name, _, key), old, new in zip(self.keys, before, now, strict=True)
                if old != new]


def live_modules(graph_module: fx.GraphModule, frontend: str) -> set[str]:
    """The layers the graph calls as modules (``call_module``), which read their settings when
    called; torch.export's graphs call none (every setting is a number in the graph)."""
    if frontend != "symbolic_trace":
        return set()
    return {str(node.target) for node in graph_module.graph.nodes if node.op == "call_module"}
