"""How to read a linear operator in a graph: rules as data, and the operands they point at.

Each supported operator maps to where its weight, bias, input and hyper-parameters sit (positional
index and keyword); a weight operand is resolved through the ways models build it from one
parameter (a row slice of a packed parameter, a transpose, ``_weight_norm(v, g, dim)``). The
``find_sites`` pass walks a graph with these rules; nothing here looks at a whole graph.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

from morphc.ir.sites import ConvConfig
from morphc.ir.weight_views import returns_to_shape, view_chain

aten = torch.ops.aten


@dataclass(frozen=True)
class _FunctionRule:
    """Where a functional site keeps its operands: positional index and keyword name."""

    kind: str                      # a SiteKind name
    label: str
    weight: tuple[int, str]
    bias: tuple[int, str] | None = None
    input: int = 0
    conv_dim: int | None = None    # None for convolution.default: read from the weight
    layout: str = "plain"          # plain | aten_convolution | transpose | addmm
    out_dim: int = 0               # the weight dimension that indexes outputs


_LINEAR = dict(kind="linear", weight=(1, "weight"), bias=(2, "bias"))
_CONV = dict(kind="conv", weight=(1, "weight"), bias=(2, "bias"))
_CONV_T = dict(kind="conv_transpose", weight=(1, "weight"), bias=(2, "bias"), layout="transpose",
               out_dim=1)
FUNCTION_RULES: dict[object, _FunctionRule] = {
    F.linear: _FunctionRule(label="F.linear", **_LINEAR),                      # x Wᵀ + b
    aten.linear.default: _FunctionRule(label="aten.linear", **_LINEAR),
    F.conv1d: _FunctionRule(label="F.conv1d", conv_dim=1, **_CONV),            # W ⋆ x + b
    F.conv2d: _FunctionRule(label="F.conv2d", conv_dim=2, **_CONV),
    F.conv3d: _FunctionRule(label="F.conv3d", conv_dim=3, **_CONV),
    aten.conv1d.default: _FunctionRule(label="aten.conv1d", conv_dim=1, **_CONV),
    aten.conv2d.default: _FunctionRule(label="aten.conv2d", conv_dim=2, **_CONV),
    aten.conv3d.default: _FunctionRule(label="aten.conv3d", conv_dim=3, **_CONV),
    aten.conv1d.padding: _FunctionRule(label="aten.conv1d", conv_dim=1, **_CONV),
    aten.conv2d.padding: _FunctionRule(label="aten.conv2d", conv_dim=2, **_CONV),
    aten.conv3d.padding: _FunctionRule(label="aten.conv3d", conv_dim=3, **_CONV),
    aten.convolution.default: _FunctionRule(label="aten.convolution",
                                            layout="aten_convolution", **_CONV),
    F.conv_transpose1d: _FunctionRule(label="F.conv_transpose1d", conv_dim=1, **_CONV_T),
    F.conv_transpose2d: _FunctionRule(label="F.conv_transpose2d", conv_dim=2, **_CONV_T),
    F.conv_transpose3d: _FunctionRule(label="F.conv_transpose3d", conv_dim=3, **_CONV_T),
    aten.conv_transpose1d.default: _FunctionRule(label="aten.conv_transpose1d", conv_dim=1,
                                                 **_CONV_T),
    aten.conv_transpose2d.input: _FunctionRule(label="aten.conv_transpose2d", conv_dim=2,
                                               **_CONV_T),
    aten.conv_transpose3d.input: _FunctionRule(label="aten.conv_transpose3d", conv_dim=3,
                                               **_CONV_T),
    # b + x P with P = Wᵀ stored (in, out): HF Conv1D (GPT-2); beta = alpha = 1 checked
    torch.addmm: _FunctionRule(kind="matmul_right", label="torch.addmm", weight=(2, "mat2"),
                               bias=(0, "input"), input=1, layout="addmm", out_dim=1),
    aten.addmm.default: _FunctionRule(kind="matmul_right", label="aten.addmm",
                                      weight=(2, "mat2"), bias=(0, "self"), input=1,
                                      layout="addmm", out_dim=1),
}
MATMUL_TARGETS = {operator.matmul: "@", torch.matmul: "torch.matmul", torch.mm: "torch.mm",
                  aten.matmul.default: "aten.matmul", aten.mm.default: "aten.mm"}
SITE_MODULES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d,
                nn.ConvTranspose2d, nn.ConvTranspose3d)

_RNN = ("fused RNN op: the weights act inside the recurrence, where a branch cannot be inserted "
        "without unrolling the cell")
_RNN_CELL = ("fused RNN cell op: the weights feed the gates inside one fused kernel, where a "
             "branch cannot be inserted; to extend them, write the cell with nn.Linear layers")
_SCRIPTED = ("inside a torch.jit.script-ed module: compiled TorchScript, which a graph calls but "
             "cannot see into; to extend it, pass the module before scripting (and script the "
             "contracted model)")
_BILINEAR = "bilinear map x1ᵀ W x2: linear in neither input alone, so no bypass branch folds in"
_BATCHED_3D = ("{op} against the 3-D parameter {name} {shape}: G separate linear maps, one per "
               "batch slice, and one bypass branch is one map shared by every slice, so it folds "
               "into no single weight; to extend it, write G F.linear calls (one 2-D weight "
               "each), or broadcast one 2-D weight (W.expand(G, -1, -1)) if the slices share it")
_BATCHED_OTHER = ("{op} against the parameter {name} {shape} through {how}: only a 2-D weight "
                  "broadcast over the batch (W.expand(G, -1, -1), W.unsqueeze(0).expand(...)) "
                  "with beta = alpha = 1 is read as a site")
_EXPERTS = ("{op} against the expert weights {name} {shape} (mixture of experts): each token "
            "is routed at run time to its own experts' slices, and one bypass branch is one map "
            "for every token, so it folds into no single slice; the router, attention and shared "
            "experts are sites")
# a per-token weight taken out of a stack of expert weights: W[ids], W[e], W.transpose(-2, -1)
_EXPERT_GATHERS = {aten.index.Tensor, aten.select.int, aten.index_select.default,
                   aten.transpose.int, aten.permute.default, aten.contiguous.default,
                   aten.expand.default, aten.unsqueeze.default}


def is_grouped_mm(target) -> bool:
    """``aten._grouped_mm``, ``F.grouped_mm``, transformers' ``grouped_mm_fallback``: one matmul
    per group of rows, each against its own slice of a 3-D weight (how MoE experts run)."""
    name = target.name() if hasattr(target, "name") else getattr(target, "__name__", "")
    return "grouped_mm" in str(name)


# operators whose parameter operands are linear-operator weights that cannot be sites
EXCLUDED_TARGETS: dict[object, str] = {
    aten.lstm.input: _RNN, aten.gru.input: _RNN, aten.rnn_tanh.input: _RNN,
    aten.rnn_relu.input: _RNN, aten.lstm.data: _RNN, aten.gru.data: _RNN,
    # the one-step cells (nn.RNNCell, GRUCell, LSTMCell as torch.export records them)
    aten.rnn_tanh_cell.default: _RNN_CELL, aten.rnn_relu_cell.default: _RNN_CELL,
    aten.gru_cell.default: _RNN_CELL, aten.lstm_cell.default: _RNN_CELL,
    aten.bilinear.default: _BILINEAR, F.bilinear: _BILINEAR,
}
EXCLUDED_MODULES: tuple[tuple[type, str], ...] = ((nn.RNNBase, _RNN), (nn.RNNCellBase, _RNN_CELL),
                                                   (nn.Bilinear, _BILINEAR),
                                                   (torch.jit.ScriptModule, _SCRIPTED))
EINSUM_TARGETS = {torch.einsum: "torch.einsum", aten.einsum.default: "aten.einsum"}
# label, bias position (None: bmm), (position, keyword) of batch1 and batch2
_BADDBMM_ARGS = (0, (1, "batch1"), (2, "batch2"))
BATCHED_TARGETS = {aten.baddbmm.default: ("aten.baddbmm", *_BADDBMM_ARGS),
                   torch.baddbmm: ("torch.baddbmm", *_BADDBMM_ARGS),
                   aten.bmm.default: ("aten.bmm", None, (0, "self"), (1, "mat2")),
                   torch.bmm: ("torch.bmm", None, (0, "input"), (1, "mat2"))}
_BROADCASTS = {aten.expand.default, aten.unsqueeze.default, "expand", "unsqueeze"}
_SPLITS = {aten.split_with_sizes.default, aten.split.Tensor, aten.chunk.default, torch.split,
           torch.chunk, aten.split_with_sizes_copy.default, aten.split_copy.Tensor}
_TRANSPOSES = {aten.t.default, torch.t, "t"}     # "t": the method W.t() under symbolic_trace
_ATTR_TRANSPOSES = {aten.numpy_T.default, aten.mT.default}        # W.T, W.mT under export
_SWAPS = {aten.transpose.int, torch.transpose, "transpose", aten.swapaxes.default,
          torch.swapaxes, "swapaxes", aten.swapdims.default, torch.swapdims, "swapdims"}
_PERMUTES = {aten.permute.default, torch.permute, "permute"}


def is_transpose(node) -> bool:
    """``node`` swaps the two dimensions of a matrix: ``W.t()``, ``W.T``, ``W.mT``,
    ``W.transpose(0, 1)`` / ``(-1, -2)``, ``W.permute(1, 0)`` (for a 2-D ``W``; the caller
    checks the dimension)."""
    if not isinstance(node, fx.Node) or node.op not in ("call_function", "call_method"):
        return False
    target, args = node.target, node.args
    if target in _TRANSPOSES or target in _ATTR_TRANSPOSES:
        return len(args) == 1 and not node.kwargs
    if target is getattr:
        return len(args) == 2 and args[1] in ("T", "mT")
    dims = [*args[1:], *node.kwargs.values()]
    if target in _PERMUTES:
        dims = list(dims[0]) if len(dims) == 1 and isinstance(dims[0], list | tuple) else dims
        return len(dims) == 2 and all(isinstance(d, int) for d in dims) and \
            [d % 2 for d in dims] == [1, 0]
    if target in _SWAPS:
        return len(dims) == 2 and all(isinstance(d, int) for d in dims) and \
            {d % 2 for d in dims} == {0, 1}
    return False
_WEIGHT_NORM = {aten._weight_norm.default, torch._weight_norm}


def _arg(node: fx.Node, index: int, name: str, default=None):
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _ntuple(value, dim: int) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * dim
    value = tuple(int(v) for v in value)
    return value * dim if len(value) == 1 else value


def _shape(node) -> tuple[int, ...] | None:
    if not isinstance(node, fx.Node):
        return None
    meta = node.meta.get("tensor_meta")
    shape = getattr(meta, "shape", None)
    if shape is None and isinstance(node.meta.get("val"), torch.Tensor):
        shape = node.meta["val"].shape
    if shape is None:
        return None
    return tuple(_size(d) for d in shape)


def _size(d) -> int:
    """A dimension at the example inputs: torch.export marks every size it lets vary symbolic
    (sequence length too, not only the batch), and its hint is the example's size; -1 only when
    it has none (a data-dependent size)."""
    if not isinstance(d, torch.SymInt):
        return int(d)
    hint = d.node.hint
    return int(hint) if hint is not None else -1


@dataclass
class _Ref:
    """A weight/bias operand resolved to a parameter: which rows of it, through which nodes."""

    name: str
    tensor: torch.Tensor
    edges: list[tuple[fx.Node, fx.Node | None]]   # (node, its reader); None: the operator
    rows: tuple[int, int] | None = None
    weight_norm: tuple[str, torch.Tensor, int] | None = None   # (g name, g, dim)
    transposed: bool = False

    @property
    def key(self) -> tuple[int, tuple[int, int] | None]:
        return id(self.tensor), self.rows

    @property
    def shape(self) -> tuple[int, ...]:
        if self.weight_norm is not None or self.rows is None:
            return tuple(self.tensor.shape)
        return (self.rows[1] - self.rows[0], *self.tensor.shape[1:])


def _param_node(gm, arg) -> tuple[str, torch.Tensor] | None:
    if isinstance(arg, fx.Node) and arg.op == "get_attr":
        try:
            tensor = gm.get_parameter(arg.target)
        except AttributeError:
            return None
        return arg.target, tensor
    return None


def _split_rows(node: fx.Node, size0: int) -> list[tuple[int, int]] | None:
    """Row ranges of the pieces of a split/chunk along dimension 0 (None: another dim)."""
    dim = _arg(node, 2, "dim", 0)
    if dim != 0:
        return None
    spec = node.args[1]
    if node.target in (aten.chunk.default, torch.chunk):
        step = -(-size0 // int(spec))
        sizes = [min(step, size0 - i) for i in range(0, size0, step)]
    elif isinstance(spec, int):
        sizes = [min(spec, size0 - i) for i in range(0, size0, spec)]
    else:
        sizes = [int(s) for s in spec]
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    return [(a, a + s) for a, s in zip(starts, sizes, strict=True)]


def _resolve(gm, arg) -> _Ref | None:
    """The parameter (rows) behind an operand, through slicing, ``t`` and weight_norm."""
    param = _param_node(gm, arg)
    if param is not None:
        return _Ref(param[0], param[1], [(arg, None)])
    viewed = view_chain(arg)                # W.squeeze(1).unsqueeze(1): W itself
    param = _param_node(gm, viewed[0]) if viewed else None
    if param is not None and returns_to_shape(viewed[1], param[1].shape):
        chain = viewed[1]             # (node, its reader), from the parameter outwards
        links = list(zip(chain[1:], chain[:-1], strict=True))
        return _Ref(param[0], param[1], [(viewed[0], chain[-1]), *links, (chain[0], None)])
    if not isinstance(arg, fx.Node) or arg.op not in ("call_function", "call_module") and \
            not is_transpose(arg):
        return None
    if arg.op == "call_module":
        module = gm.get_submodule(arg.target)
        if type(module).__name__ == "_WeightNorm" and len(arg.args) == 2:
            g, v = (_param_node(gm, a) for a in arg.args)
            if g and v:
                return _Ref(v[0], v[1], [(arg.args[1], arg), (arg.args[0], arg), (arg, None)],
                            weight_norm=(g[0], g[1], int(module.dim)))
        return None
    if arg.target in _WEIGHT_NORM:
        v, g = _param_node(gm, arg.args[0]), _param_node(gm, arg.args[1])
        if v and g:
            return _Ref(v[0], v[1], [(arg.args[0], arg), (arg.args[1], arg), (arg, None)],
                        weight_norm=(g[0], g[1], int(_arg(arg, 2, "dim", 0))))
        return None
    if is_transpose(arg):
        inner = _param_node(gm, arg.args[0])
        if inner and inner[1].dim() == 2:
            return _Ref(inner[0], inner[1], [(arg.args[0], arg), (arg, None)],
                        transposed=True)
        return None
    if arg.target is operator.getitem and isinstance(arg.args[0], fx.Node) \
            and arg.args[0].target in _SPLITS:
        split = arg.args[0]
        inner = _param_node(gm, split.args[0])
        rows = _split_rows(split, inner[1].shape[0]) if inner else None
        if rows and isinstance(arg.args[1], int) and arg.args[1] < len(rows):
            return _Ref(inner[0], inner[1], [(split.args[0], split), (split, arg), (arg, None)],
                        rows=rows[arg.args[1]])
        return None
    inner = _param_node(gm, arg.args[0]) if arg.args else None
    rows = _row_slice(arg, inner[1].shape[0]) if inner else None
    if rows is not None:
        return _Ref(inner[0], inner[1], [(arg.args[0], arg), (arg, None)], rows=rows)
    return None


def _row_slice(node: fx.Node, size0: int) -> tuple[int, int] | None:
    """The rows ``[start, stop)`` a unit-step slice along dimension 0 takes, bounds normalised
    as Python does (``W[-k:]``, ``W[a:-b]``; ``W[:k]`` is ``getitem`` under symbolic_trace,
    ``aten.slice`` under torch.export); None for any other indexing or an empty slice."""
    if node.target is aten.slice.Tensor:
        if _arg(node, 1, "dim", 0) != 0:
            return None
        piece = slice(_arg(node, 2, "start", None), _arg(node, 3, "end", None),
                      _arg(node, 4, "step", None))
    elif node.target is operator.getitem:
        index = node.args[1]
        if isinstance(index, tuple):     # W[a:b, :] and W[a:b, ...]
            if not index or any(i is not Ellipsis and i != slice(None) for i in index[1:]):
                return None
            index = index[0]
        if not isinstance(index, slice):
            return None
        piece = index
    else:
        return None
    if not all(v is None or isinstance(v, int) for v in (piece.start, piece.stop, piece.step)):
        return None
    start, stop, step = piece.indices(size0)
    return (start, stop) if step == 1 and stop > start else None


def resolve_broadcast(gm, arg) -> tuple[_Ref | None, str]:
    """A batch operand of ``bmm`` / ``baddbmm`` built from one 2-D parameter broadcast over the
    batch (``W.expand(G, -1, -1)``, ``W.unsqueeze(0).expand(G, n, m)``): the parameter, or None
    and how the operand was built (for the exclusion's reason)."""
    chain, node = [], arg
    while isinstance(node, fx.Node) and node.op in ("call_function", "call_method") and \
            node.target in _BROADCASTS:
        chain.append(node)
        node = node.args[0]
    param = _param_node(gm, node)
    if param is None:
        return None, ""
    how = " -> ".join(str(getattr(n.target, "__name__", n.target)) for n in reversed(chain))
    name, tensor = param
    if tensor.dim() != 2 or not chain:
        return None, how or "directly"
    edges, reader = [], None
    for link in chain:                        # the operator reads chain[0], which reads chain[1]…
        edges.append((link, reader))
        reader = link
    edges.append((node, reader))
    for link in chain:
        sizes = list(link.args[1:])
        if len(sizes) == 1 and isinstance(sizes[0], list | tuple):
            sizes = list(sizes[0])
        if link.target in (aten.unsqueeze.default, "unsqueeze"):
            if sizes not in ([0], [-3]) or link is not chain[-1]:
                return None, how
        elif len(sizes) != 3 or any(r not in (-1, n) for r, n in zip(sizes[1:], tensor.shape,
                                                                     strict=True)):
            return None, how
    return _Ref(name, tensor, edges[::-1]), how


def _conv_from_module(m: nn.modules.conv._ConvNd) -> ConvConfig:
    padding = m.padding if isinstance(m.padding, str) else tuple(m.padding)
    transposed = isinstance(m, nn.modules.conv._ConvTransposeNd)
    return ConvConfig(len(m.kernel_size), tuple(m.kernel_size), tuple(m.stride), padding,
                      tuple(m.dilation), m.groups, m.padding_mode, transposed,
                      tuple(m.output_padding) if transposed else ())


def _conv_from_node(node: fx.Node, rule: _FunctionRule, weight: torch.Tensor) -> ConvConfig:
    dim = rule.conv_dim or weight.dim() - 2
    if rule.layout == "aten_convolution":
        transposed = bool(_arg(node, 6, "transposed", False))
        return ConvConfig(
            dim, tuple(weight.shape[2:]), _ntuple(_arg(node, 3, "stride", 1), dim),
            _ntuple(_arg(node, 4, "padding", 0), dim), _ntuple(_arg(node, 5, "dilation", 1), dim),
            int(_arg(node, 8, "groups", 1)), "zeros", transposed,
            _ntuple(_arg(node, 7, "output_padding", 0), dim) if transposed else ())
    if rule.layout == "transpose":
        return ConvConfig(
            dim, tuple(weight.shape[2:]), _ntuple(_arg(node, 3, "stride", 1), dim),
            _ntuple(_arg(node, 4, "padding", 0), dim), _ntuple(_arg(node, 7, "dilation", 1), dim),
            int(_arg(node, 6, "groups", 1)), "zeros", True,
            _ntuple(_arg(node, 5, "output_padding", 0), dim))
    padding = _arg(node, 4, "padding", 0)
    return ConvConfig(
        dim, tuple(weight.shape[2:]), _ntuple(_arg(node, 3, "stride", 1), dim),
        padding if isinstance(padding, str) else _ntuple(padding, dim),
        _ntuple(_arg(node, 5, "dilation", 1), dim), int(_arg(node, 6, "groups", 1)),
    )


def _features(kind: str, shape: tuple[int, ...], conv: ConvConfig | None) -> tuple[int, int]:
    """``(in, out)`` of an operator from its weight's shape."""
    if kind == "conv_transpose":
        return shape[0], shape[1] * conv.groups
    if kind == "matmul_right":
        return shape[0], shape[1]
    return shape[1] * (conv.groups if conv else 1), shape[0]
