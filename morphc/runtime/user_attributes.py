"""What a closure reads off the module it is given, besides calling it, during a cycle.

A closure often reads more than ``m(x)``: a learned variance or task weights
(``m.log_var``), a head the forward does not use (``m.head(z)``), a temperature. During a cycle
``m`` is the extended model, which had none of these: every cycle failed at its first step and
was rolled back, so such a run could never morph. They are the user's own objects, read from the
user's model. A submodule holding extended layers is not: outside ``m(...)`` it would run
without its branches, so reading one stays an error that says what to do instead.

The same holds for what Bypass wraps around the module (``compile=True``, ``ddp=True``): the
closure is also called on the unwrapped model (to judge a cycle, on plain training's copy), so
``m.log_var`` must read the same object through every wrapper Bypass builds.
"""

from __future__ import annotations

import torch
from torch import nn
from torch._dynamo.eval_frame import OptimizedModule

from morphc.compiler.extended import ExtendedModel as CompiledExtension


def _users_first(name: str) -> property:
    """``m.<name>`` for a name the extended model has too (``config``, ``sites``, …): the
    user's model's attribute when it has one (a Hugging Face model's ``m.config.num_labels``),
    else the extension's. The closure's ``m`` stands for the user's model; morphc itself reads
    ``extension_<name>``."""
    def read(self):
        model = self.__dict__.get("_model")
        value = None if model is None else getattr(model, name, None)
        if value is None:
            return getattr(self, f"extension_{name}")
        return self._users(name, value)

    return property(read, doc=_users_first.__doc__)


class ExtendedModel(CompiledExtension):
    """The compiler's extended model, whose missing attributes are the user's model's (data,
    Parameters, buffers, layers without an extended site). Same name: users and their
    ``wrap`` see the ``ExtendedModel`` the README speaks of."""

    config = _users_first("config")
    sites = _users_first("sites")
    branches = _users_first("branches")
    traced = _users_first("traced")
    pipeline = _users_first("pipeline")

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            model = self.__dict__.get("_model")
            if model is None or name.startswith("_"):
                raise
        # the user's AttributeError when it has none
        return self._users(name, getattr(model, name))

    def _users(self, name: str, value):
        """``value``, the user's model's attribute ``name``, unless it would run layers that
        are extended outside ``m(...)``: then an AttributeError that says what to do."""
        if isinstance(value, nn.Module):
            extended = [s.weight_name for s in self.extension_sites
                        if s.weight_name.startswith(f"{name}.")]
            if not extended:
                return value
            why = f"m.{name} holds extended layers ({', '.join(extended[:3])})"
        elif isinstance(value, torch.Tensor) or not callable(value):
            return value
        else:
            why = f"m.{name} is a method of your model, which may run its layers"
        raise AttributeError(
            f"during a cycle the closure's module is the extended model and {why}: outside "
            f"m(...) they would run without their branches. Let forward compute what the loss "
            f"needs (return a tuple or dict) and call m(...)")


def reads_user_model(ext: CompiledExtension) -> ExtendedModel:
    """``ext``, answering the closure's reads of the user's attributes (same object)."""
    ext.__class__ = ExtendedModel
    return ext


class CompiledGraph(OptimizedModule):
    """``torch.compile`` of the extended graph (compiled alone, so returning never recompiles),
    whose public attributes are the extended model's: the graph module has none of the user's
    attributes the forward does not use, and reads through it would skip the refusal above.
    Named ``OptimizedModule`` as what it is (tools compare type names)."""

    def __getattr__(self, name: str):
        extended = self.__dict__.get("_extended")
        if extended is None or name.startswith("_") or name == "training":   # .train() sets
            return super().__getattr__(name)             # the compiled graph's, not ext's
        return getattr(extended, name)


def compiled_reads_user_model(compiled: OptimizedModule, ext: ExtendedModel) -> OptimizedModule:
    """``compiled`` (``torch.compile(ext.graph_module)``), answering reads as ``ext`` does."""
    object.__setattr__(compiled, "_extended", ext)    # not a submodule: no parameters twice
    compiled.__class__ = CompiledGraph
    return compiled


class DistributedModel(nn.parallel.DistributedDataParallel):
    """Bypass's DDP wrapper, whose missing public attributes are its module's: the closure is
    also called on the unwrapped model, where ``m.log_var`` is the only spelling that works.
    Named ``DistributedDataParallel`` as what it is (tools compare type names)."""

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.startswith("_") or name == "buffer_hook":   # DDP asks hasattr of its own
                raise
        return getattr(self._modules["module"], name)


CompiledGraph.__name__ = "OptimizedModule"            # the qualname stays: pickle finds it
DistributedModel.__name__ = "DistributedDataParallel"


def ddp_reads_module(ddp: nn.parallel.DistributedDataParallel) -> DistributedModel:
    ddp.__class__ = DistributedModel
    return ddp
