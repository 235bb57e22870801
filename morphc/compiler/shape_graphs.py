"""More graphs for one extension: the shapes the first trace refuses but the eager model takes.

torch.export fixes or guards dimensions the eager model lets vary (Hugging Face MobileNetV2's
``apply_tf_padding`` fixes H = W; ViT's position interpolation guards H·W; Swin's window
padding). Like torch.compile recompiling on a guard failure, an extended model called with such a
shape traces the user's model again at that shape (``morphc.trace`` caches it per model and
input signature, so a later extension of the same model does not export again), finds the same
sites and inserts the *same* branch modules.

Why this is sound with contraction: every graph reads the user's own Parameters and the same
branch modules, and ``contract`` folds each branch once, by parameter name, from the branch alone
(``ΔW = B·diag(p)·A``, ``Δb = B·(p ⊙ a + q)``). That fold is right for every graph that uses the
site the same way — same operator kind, features, conv settings, row slice and biases — so a new
graph whose use of a chosen site differs is refused. Bypass is unaffected: its rollback restores
the Parameters every graph reads, and each cycle's extension starts with no extra graph.

Bounded: at most ``limit`` extra graphs per extension (``DEFAULT_RETRACES`` when morphc chose
the dynamic dimensions; none when the user passed ``dynamic_shapes``, whose static dimensions are
then taken as meant). Past that, or when the eager model itself refuses the shape, the call
raises the :class:`~morphc.errors.ShapeError` it would have raised, with the reason added.

A Python number input that changed (``temperature=t``, ``training_stage=2``; torch.export bakes
it in, :mod:`morphc.ir.python_numbers`) is traced again too — right for an int or bool flag with
a few values — but a float that changes a second time is refused at once: an annealed value
would spend every re-trace one value at a time, and the message says to pass a tensor.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from dataclasses import dataclass

import torch
from torch import fx, nn

from morphc.errors import MorphcError, ShapeError
from morphc.ir.example_inputs import describe_inputs
from morphc.ir.python_numbers import BakedNumber
from morphc.ir.sites import Site
from morphc.ir.trace import trace
from morphc.ir.traced_model import TracedModel
from morphc.passes.find_sites import find_sites
from morphc.passes.infra import Pipeline
from morphc.passes.insert_extension import insert_extension

DEFAULT_RETRACES = 8      # as torch.compile's recompile limit per code object


@dataclass
class Retrace:
    """One extra graph an extended model traced: for which inputs, and what it cost."""

    inputs: str
    seconds: float
    cached: bool          # the trace came from morphc.trace's cache (no export ran)
    reason: str           # the ShapeError the first graph raised


def _use_key(site: Site) -> tuple:
    """What must be equal for one branch to serve a site in two graphs."""
    biases = sorted({(u.bias_name or "", u.bias_rows or ()) for u in site.uses})
    return (site.kind, site.in_features, site.out_features, site.conv, site.rows,
            site.weight_norm, site.bias_foldable, tuple(biases))


def matching_sites(chosen: list[Site], table, gm: fx.GraphModule) -> list[Site] | str:
    """The sites of a new graph that correspond to ``chosen`` (renamed to their names), or why
    one of them cannot be served by its branch there. A site whose weight the new graph does not
    read at all needs no branch there: its fold changes nothing that graph computes."""
    by_weight = {(s.weight_name, s.rows): s for s in table.values()}
    read = {n.target for n in gm.graph.nodes if n.op == "get_attr" and n.users}
    found = []
    for site in chosen:
        new = by_weight.get((site.weight_name, site.rows))
        if new is None and site.weight_name not in read and \
                (site.weight_norm is None or site.weight_norm[0] not in read):
            continue
        if new is None or new.excluded:
            return (f"at this shape the weight of site {site.name} is "
                    + (f"excluded ({new.excluded})" if new is not None else
                       "used by other operators"))
        if _use_key(new) != _use_key(site):
            return (f"at this shape the graph uses site {site.name} differently "
                    f"({_use_key(site)} before, {_use_key(new)} now)")
        found.append(dataclasses.replace(new, name=site.name))
    return found


class _TrainingAs:
    """Put every submodule in the mode of the first trace, then restore each one's own flag."""

    def __init__(self, model: nn.Module, training: bool) -> None:
        self.model, self.training = model, training

    def __enter__(self):
        self.flags = {m: m.training for m in self.model.modules()}
        self.model.train(self.training)

    def __exit__(self, *exc):
        for module, flag in self.flags.items():
            module.training = flag
        return False


class ShapeGraphs:
    """The extra graphs of one extension, tried in order after the first (see module doc)."""

    def __init__(self, limit: int = DEFAULT_RETRACES) -> None:
        self.limit = int(limit)
        self.graphs: list[tuple[TracedModel, fx.GraphModule]] = []
        self.retraces: list[Retrace] = []
        self.refused: dict[str, str] = {}
        self.mode_graphs: dict[bool, tuple[TracedModel, fx.GraphModule]] = {}
        self.numbers: dict[str, list] = {}     # Python number input -> values traced again for

    def call(self, ext, args: tuple, kwargs: dict, error: ShapeError):
        """Run ``ext``'s branches on a shape its first graph refused (``error``)."""
        for traced, gm in self.graphs:
            try:
                return traced.call(gm, args, kwargs)
            except ShapeError:
                continue
        traced, gm = self._add(ext, args, kwargs, error)
        return traced.call(gm, args, kwargs)

    def call_in_mode(self, ext, args: tuple, kwargs: dict):
        """Run ``ext`` in the mode it is in now when its exported graph was traced in the other
        one: an exported graph bakes dropout and BatchNorm in the mode it was traced in. The
        model is exported once more in this mode, at the example inputs and with the first
        graph's dynamic shapes, and the same branches are inserted (sound with contraction
        for the reason every extra graph is)."""
        entry = self.mode_graphs.get(ext.training)
        if entry is None:
            primary = ext.extension_traced
            try:
                entry = _branched_graph(ext, primary.example_inputs, primary.example_kwargs,
                                        ext.training)
            except MorphcError as exc:
                mode = "train" if ext.training else "eval"
                raise ShapeError(f"this extension was exported in the other mode and the model "
                                 f"could not be exported again in {mode} mode ({exc}); extend "
                                 f"the model in the mode you will call it in") from exc
            entry[1].train(ext.training)
            self.mode_graphs[ext.training] = entry
        traced, gm = entry
        return traced.call(gm, args, kwargs)

    def _add(self, ext, args: tuple, kwargs: dict, error: ShapeError):
        primary = ext.extension_traced
        positional = {n for n in primary.input_names[:len(args)] if not n.startswith("*")}
        kwargs = {**{k: v for k, v in primary.example_kwargs.items()
                     if k not in kwargs and k not in positional
                     and not isinstance(v, torch.Tensor)}, **kwargs}
        what = describe_inputs(args, kwargs)
        if what in self.refused:
            raise ShapeError(f"{error} {self.refused[what]}") from None
        self._refuse_changing_float(error)
        if len(self.graphs) >= self.limit:     # (a symbolic graph refuses only a None input)
            fix = ("pass it as a tensor" if isinstance(error, BakedNumber) else
                   "make the dimension dynamic with dynamic_shapes=...")
            held = (f"this extension already holds {len(self.graphs)} more graphs for other "
                    "shapes" if self.limit else "dynamic_shapes was given, so morphc does not "
                    "trace again at other shapes" if primary.dynamic_shapes is not None else
                    "tracing again at other shapes is off")
            more = f"({held}: max_retraces={self.limit}; {fix} or raise max_retraces)"
            raise (error.extended(more) if isinstance(error, BakedNumber) else
                   ShapeError(f"{error} {more}")) from None
        started = time.perf_counter()
        try:
            traced, gm = _branched_graph(ext, args, kwargs, primary.training)
        except MorphcError as exc:
            self.refused[what] = f"(tracing the model again at this shape failed: {exc})"
            raise ShapeError(f"{error} {self.refused[what]}") from exc
        gm.train(ext.training)
        if isinstance(error, BakedNumber):
            self.numbers.setdefault(error.label, [error.old]).append(error.new)
        self.graphs.append((traced, gm))
        record = Retrace(what, time.perf_counter() - started, traced.cached,
                         str(error).split(" To allow it")[0])
        self.retraces.append(record)
        warnings.warn(f"morphc: the extended {type(ext.model).__name__} traced its model again "
                      f"for inputs {what} ({record.seconds:.2f} s"
                      f"{', cached trace' if record.cached else ''}; graph "
                      f"{len(self.graphs)} of at most {self.limit} extra): the first graph "
                      f"refused them ({record.reason})", stacklevel=4)
        return traced, gm

    def _refuse_changing_float(self, error: ShapeError) -> None:
        """A float input traced again once already and now changed again is refused."""
        if not isinstance(error, BakedNumber) or not isinstance(error.new, float) or \
                error.label not in self.numbers:
            return
        seen = ", then ".join(map(repr, self.numbers[error.label]))
        raise error.extended(f"It has changed again ({seen}, now {error.new!r}): a float that "
                             "keeps changing would spend every re-trace (max_retraces="
                             f"{self.limit}) one value at a time, so morphc refuses it now.") \
            from None

    def apply(self, fn) -> None:
        """``.to()`` / ``.double()`` on the extra graphs too (they share the user's tensors)."""
        for _, gm in [*self.graphs, *self.mode_graphs.values()]:
            gm._apply(fn)


def _branched_graph(ext, args: tuple, kwargs: dict, training: bool):
    """The user's model exported again (in ``training`` mode, at these inputs) with ``ext``'s
    own branch modules inserted at the matching sites; raises a MorphcError when it cannot be."""
    with _TrainingAs(ext.model, training):
        traced = trace(ext.model, args, frontend="export", kwargs=kwargs,
                       dynamic_shapes=ext.extension_traced.dynamic_shapes)
    analysed = Pipeline(traced.graph_module)
    sites = matching_sites(ext.extension_sites, analysed.run(find_sites).analysis,
                           traced.graph_module)
    if isinstance(sites, str):
        raise ShapeError(sites)
    pipeline = analysed.fork()
    pipeline.run(insert_extension, sites, ext.extension_branches)
    return traced, pipeline.graph_module
