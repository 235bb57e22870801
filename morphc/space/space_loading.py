"""Reading back a saved model space (``space.save(directory, weights="all")``) — data only.

``space.json`` holds the graph of architectures (nodes, moves, scores, refusals) and
``nodes/<hash>.{json,pt}`` each node's architecture and weights, written by
:mod:`morphc.space.space_files`. Loading checks every field of ``space.json`` strictly (exact
fields, strict JSON types, node ids that are architecture hashes and nothing else, since they
name files), builds each architecture with :func:`morphc.space.loading.load` (validated,
allow-listed, ``weights_only=True``, digests checked) and then requires the structural hash of
what it built to be the node's id. An extended node (temporary branches, saved as its graph) is
rebuilt by applying the recorded ``Extend`` move again to its restored parent, loading its
saved weights and homotopy, and checking it computes exactly what the saved graph computes.
Nothing from a file is evaluated or executed.
"""

from __future__ import annotations

import math
import re
from os import PathLike
from pathlib import Path

import networkx as nx
import torch

from morphc.compiler.deviation import deterministic_forward
from morphc.compiler.extended import ExtendedModel
from morphc.errors import FormatError, MorphcError
from morphc.ir.branch import BypassBranch
from morphc.ir.example_inputs import ExampleInputs
from morphc.ir.tags import EXTENSION_PREFIX
from morphc.space.architecture import architecture_hash
from morphc.space.encoding import SPACE_FORMAT, check_version
from morphc.space.graph import ModelSpace, _parameter_count, summarize
from morphc.space.loading import PrefixError, _read_document, load
from morphc.space.move_base import annotate, failure
from morphc.space.moves import Extend
from morphc.space.schema import _fields, _typed

_SPACE_KEYS = {"format", "version", "root", "best", "tolerance", "train_tolerance",
               "steps_spent", "nodes", "edges", "rejected"}
_NODE_KEYS = {"id", "order", "kind", "summary", "params", "steps", "visits", "score", "scores",
              "architecture"}
_EDGE_KEYS = {"source", "target", "move", "spec", "change", "change_train", "count", "order"}
_EXTEND_KEYS = {"move", "sites", "width", "activation", "seed"}
_NODE_ID = re.compile(r"[0-9a-f]{16}")     # architecture_hash: 8 bytes in hex; names files
_MAX_COUNT = 2 ** 63      # what a count can be when torch (a seed, a size) gets it


class NotASpaceError(FormatError, FileNotFoundError):
    """The directory holds no saved space (or misses files of one): a ``FormatError``, and the
    ``FileNotFoundError`` it was before."""


def _count(value, where: str) -> int:
    value = _typed(value, int, where)
    if not 0 <= value < _MAX_COUNT:
        raise FormatError(f"{where}: expected a count in [0, 2**63), got {value!r:.40}")
    return value


def _number(value, where: str, *, null: bool = False, minimum: float = -math.inf
            ) -> float | None:
    if value is None and null:
        return None
    value = _typed(value, (int, float), where)
    try:
        value = float(value)       # an int past 1e308 overflows
    except OverflowError:
        value = math.inf
    if not math.isfinite(value) or value < minimum:
        bound = "" if minimum == -math.inf else f" ≥ {minimum:g}"
        raise FormatError(f"{where}: expected a finite number{bound}, got {value:.3g}")
    return value


def _node_files(directory: Path, name: str, what: str) -> Path:
    """The prefix of one saved architecture in the space (``nodes/<hash>`` or ``best``): both
    files there, regular files inside ``directory`` (a symlink out of it is refused)."""
    prefix = directory / name
    for suffix in (".json", ".pt"):
        path = prefix.with_name(prefix.name + suffix)
        if not path.is_file():
            raise NotASpaceError(f"{what}: {path} is missing (or not a file), so this space "
                                 "cannot be restored whole; copy the directory "
                                 "space.save(directory, weights='all') wrote with all its files")
        if not path.resolve().is_relative_to(directory.resolve()):
            raise FormatError(f"{what}: {path} leads out of {directory} (to "
                              f"{path.resolve()}); a saved space holds its own files — copy "
                              "them in instead of linking")
    return prefix


def _node_id(value, where: str) -> str:
    if type(value) is not str or not _NODE_ID.fullmatch(value):
        raise FormatError(f"{where}: expected an architecture hash (16 hex digits), got "
                          f"{value!r:.80}")
    return value


def _text(value, where: str) -> str:
    return _typed(value, str, where)


def _number_or_null(value, where: str) -> float | None:
    return _number(value, where, null=True)


def _read_fields(spec: dict, where: str, readers: dict) -> dict:
    """Each named field of ``spec`` through its reader, which names it by its place in the file
    (``nodes[3].order``) when it refuses it."""
    return {key: read(spec[key], f"{where}.{key}") for key, read in readers.items()}


def _read_node(spec, index: int) -> dict:
    where = f"nodes[{index}]"
    _fields(spec, _NODE_KEYS, where)
    node = _read_fields(spec, where, {
        "id": _node_id, "order": _count, "kind": _text, "summary": _text, "params": _count,
        "steps": _count, "visits": _count, "score": _number_or_null})
    node.update(scores=[], error=None)
    if node["kind"] not in ("graph", "extended"):
        raise FormatError(f"{where}.kind: expected 'graph' or 'extended', got {node['kind']!r}")
    for j, pair in enumerate(_typed(spec["scores"], list, f"{where}.scores")):
        if type(pair) is not list or len(pair) != 2:
            raise FormatError(f"{where}.scores[{j}]: expected [steps, score]")
        node["scores"].append([_count(pair[0], f"{where}.scores[{j}]"),
                               _number(pair[1], f"{where}.scores[{j}]", null=True)])
    architecture = _typed(spec["architecture"], dict, f"{where}.architecture")
    if set(architecture) == {"error"}:
        node["error"] = _typed(architecture["error"], str, f"{where}.architecture.error")
    return node


def _read_edge(spec, index: int, ids: set[str]) -> dict:
    where = f"edges[{index}]"
    _fields(spec, _EDGE_KEYS, where)
    edge = _read_fields(spec, where, {
        "source": _node_id, "target": _node_id, "move": _text,
        "spec": lambda value, at: _typed(value, dict, at), "change": _number,
        "change_train": _number, "count": _count, "order": _count})
    if type(edge["spec"].get("move")) is not str:
        raise FormatError(f"{where}.spec.move: expected the move's class name")
    for end in ("source", "target"):
        if edge[end] not in ids:
            raise FormatError(f"{where}.{end}: {edge[end]} is no node of the space")
    return edge


def _read_rejected(spec, index: int) -> dict:
    where = f"rejected[{index}]"
    _fields(spec, {"from", "move", "reason"}, where)
    return {key: _typed(spec[key], str, f"{where}.{key}") for key in ("from", "move", "reason")}


def _extend_move(spec: dict, where: str) -> Extend:
    """The recorded ``Extend`` move, rebuilt from its fields (typed; nothing else accepted)."""
    _fields(spec, _EXTEND_KEYS, where)
    sites = spec["sites"]
    if not (type(sites) is str or type(sites) is list and all(type(s) is str for s in sites)):
        raise FormatError(f"{where}.sites: expected a string or a list of strings")
    return Extend(sites=sites, width=_count(spec["width"], f"{where}.width"),
                  activation=_typed(spec["activation"], str, f"{where}.activation"),
                  seed=_typed(spec["seed"], int, f"{where}.seed"))


def _extended(saved, parent, move: Extend, inputs: ExampleInputs, where: str) -> ExtendedModel:
    """The extended node again: ``move`` on its restored parent, then its saved weights and
    homotopy; it must compute exactly what the saved graph computes. The move's width must be
    the saved branches' (checked before the move allocates anything)."""
    # its temporary branches only: grown and deepened ones came with the parent
    branches = [m for name, m in saved.named_modules()
                if name.startswith(f"{EXTENSION_PREFIX}.") and isinstance(m, BypassBranch)]
    widths = {m.width for m in branches}
    if widths != {move.width}:
        raise FormatError(f"{where}: the recorded {move} does not match the saved extended "
                          f"architecture (branch widths {sorted(widths)})")
    try:
        ext = move(parent, inputs)
        ext.graph_module.load_state_dict(saved.state_dict(), strict=True)
    except (MorphcError, RuntimeError) as exc:
        raise FormatError(f"{where}: the recorded {move} does not rebuild the saved extended "
                          f"architecture ({exc})") from exc
    homotopy = {float(m.homotopy) for m in branches}
    if len(homotopy) != 1:
        raise FormatError(f"{where}: its branches do not share one homotopy ({homotopy})")
    ext.set_homotopy(homotopy.pop())
    ext.train(saved.training)
    args, kwargs = tuple(inputs), dict(inputs.kwargs)
    if not _same_output(deterministic_forward(ext, args, kwargs=kwargs),
                        deterministic_forward(saved, args, kwargs=kwargs)):
        raise FormatError(f"{where}: the rebuilt extended architecture does not compute what "
                          "the saved one computes")
    return ext


def _same_output(a, b) -> bool:
    """Bit for bit, NaN where NaN is: a node whose training diverged is restored too."""
    leaves_a, leaves_b = (torch.utils._pytree.tree_leaves(t) for t in (a, b))
    return len(leaves_a) == len(leaves_b) and all(
        _same_leaf(x, y) for x, y in zip(leaves_a, leaves_b, strict=True))


def _same_leaf(x, y) -> bool:
    if not isinstance(x, torch.Tensor):
        return x == y or x != x and y != y          # NaN != NaN
    if not isinstance(y, torch.Tensor) or x.shape != y.shape or x.dtype != y.dtype:
        return False
    if not (x.is_floating_point() or x.is_complex()):
        return torch.equal(x, y)
    return bool(torch.isclose(x, y, rtol=0, atol=0, equal_nan=True).all())


def _module(directory: Path, node: dict, edges: list[dict], modules: dict, inputs,
            prefix: Path | None = None):
    """Node ``node``'s architecture with its weights (``prefix``: another saved copy of it, such
    as ``best``), checked against its id."""
    where = f"node {node['id']}"
    saved = load(prefix or _node_files(directory, f"nodes/{node['id']}", where))
    if node["kind"] == "extended":
        made = [e for e in edges if e["target"] == node["id"] and e["spec"].get("move") == "Extend"
                and e["source"] in modules and not isinstance(modules[e["source"]], ExtendedModel)]
        if not made:
            raise FormatError(f"{where} is extended, but no recorded Extend move leads to it "
                              "from a restored architecture")
        module = _extended(saved, modules[made[0]["source"]], _extend_move(
            made[0]["spec"], f"the Extend move into {node['id']}"), inputs, where)
    else:
        module = saved
        try:
            annotate(module, inputs)      # the shapes moves read, as ModelSpace records them
        except Exception as exc:
            raise FormatError(f"{where} fails on the example inputs ({failure(exc)}): pass the "
                              "inputs the space was made with") from exc
    if architecture_hash(module) != node["id"]:
        raise FormatError(f"{where}: the saved architecture hashes to {architecture_hash(module)},"
                          " not to its id (the files were edited or belong to another node)")
    found = {"params": _parameter_count(module), "summary": summarize(module)}
    for key, value in found.items():
        if prefix is None and node[key] != value:     # what space.json says of the node
            raise FormatError(f"{where}: space.json says {key} {node[key]!r:.80}, its "
                              f"architecture has {value!r}; re-save the space")
    return module


def load_space(directory, example_inputs, *, kwargs=None, dynamic_shapes=None):
    """The :class:`~morphc.space.graph.ModelSpace` saved in ``directory`` by
    ``space.save(directory, weights="all")``, with every node's weights, scores, moves and
    refusals, and the best weights ever evaluated. The example inputs are not saved: pass them
    as to ``ModelSpace(...)``. Anything that does not validate is a ``FormatError``."""
    if not isinstance(directory, str | PathLike) or not str(directory):
        raise PrefixError(f"expected the directory space.save wrote (a str or pathlib.Path), "
                          f"got {directory!r:.80}")
    directory = Path(directory)
    document = directory / "space.json"
    if not document.is_file():
        hint = (f"; pass the directory that holds it, {directory.parent}"
                if directory.is_file() else "")
        raise NotASpaceError(f"no saved model space at {directory} (no space.json file in "
                             f"it); space.save(directory, weights='all') writes one{hint}")
    data = _fields(_read_document(document), _SPACE_KEYS, "space.json")
    check_version(data, SPACE_FORMAT)
    nodes = [_read_node(spec, i) for i, spec in enumerate(_typed(data["nodes"], list, "nodes"))]
    ids = {node["id"] for node in nodes}
    if len(ids) != len(nodes) or not nodes:
        raise FormatError("space.json: node ids must be unique, and there must be a root")
    edges = [_read_edge(spec, i, ids)
             for i, spec in enumerate(_typed(data["edges"], list, "edges"))]
    for what, keys in (("node orders", [n["order"] for n in nodes]),
                       ("edge orders", [e["order"] for e in edges]),
                       ("edges", [(e["source"], e["target"]) for e in edges])):
        if len(set(keys)) != len(keys):    # a graph would merge them: not what was saved
            raise FormatError(f"space.json: {what} must be unique (each is recorded once)")
    root = _node_id(data["root"], "root")
    best = None if data["best"] is None else _node_id(data["best"], "best")
    if root not in ids or best is not None and best not in ids:
        raise FormatError("space.json: root and best must be nodes of the space")
    lost = [n for n in nodes if n["error"] is not None]
    if lost:
        raise FormatError(f"nodes {[n['id'] for n in lost]} could not be saved as data "
                          f"({lost[0]['error']:.200}"
                          "...), so this space cannot be restored whole; its moves and scores "
                          "are in space.json: make a space from your model and apply them again")
    if not (directory / "nodes").is_dir():
        raise FormatError(f"{directory} holds no node weights (saved with weights='best' or "
                          "'none'): load its best architecture with morphc.load(directory / "
                          "'best'), or save the space with space.save(directory, weights='all')")
    space = ModelSpace.__new__(ModelSpace)
    space.example_inputs = ExampleInputs.of(example_inputs, kwargs, dynamic_shapes)
    space.tolerance = _number(data["tolerance"], "tolerance", minimum=0.0)
    space.train_tolerance = _number(data["train_tolerance"], "train_tolerance", minimum=0.0)
    space.steps_spent = _count(data["steps_spent"], "steps_spent")
    space.rejected = [_read_rejected(spec, i)
                      for i, spec in enumerate(_typed(data["rejected"], list, "rejected"))]
    space.root, space._best, space.graph = root, None, nx.DiGraph()
    modules: dict = {}
    for node in sorted(nodes, key=lambda n: (n["kind"] == "extended", n["order"])):
        modules[node["id"]] = _module(directory, node, edges, modules, space.example_inputs)
    for node in sorted(nodes, key=lambda n: n["order"]):
        attrs = {k: node[k] for k in ("order", "kind", "summary", "params", "steps", "visits",
                                      "score", "scores")}
        space.graph.add_node(node["id"], module=modules[node["id"]], **attrs)
    for edge in sorted(edges, key=lambda e: e["order"]):
        space.graph.add_edge(edge["source"], edge["target"],
                             **{k: v for k, v in edge.items() if k not in ("source", "target")})
    if best is not None:
        scored = [s for _, s in space.graph.nodes[best]["scores"] if s is not None]
        best_node = next(n for n in nodes if n["id"] == best)
        space._best = (max(scored, default=math.nan), best,
                       _module(directory, best_node, edges, modules, space.example_inputs,
                               prefix=_node_files(directory, "best", "the best weights")))
    return space
