"""Nothing lost, nobody in (issue 9): a saved file is data, and every fault leaves the user whole.

Saved architectures: no saved string ever runs (a payload that would create a marker file proves
it), a missing field is an error (never a default that changes the function), and a fuzzer that
mutates every field of saved files gets either a bit-identical model or a ``FormatError``.
Contraction and moves: NaN, overflow after the cast and a model changed behind morphc's back are
refused with the user's weights bit-identical. Site selection: frozen weights, pathological
patterns. Typed errors for meta-device models and bad widths.
"""

from __future__ import annotations

import copy
import json
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from morphc.passes.widen_layer import widenable_pairs
from torch import nn

import morphc
from morphc import zoo
from morphc.errors import FormatError
from morphc.ir.branch import BypassBranch
from morphc.space.loading import load
from morphc.space.move_base import private_copy
from morphc.space.moves import Deepen, Grow, Widen
from morphc.space.saving import save

MARKER = Path(tempfile.gettempdir()) / "morphc-test-safety-marker"
RUN = f"__import__('pathlib').Path({str(MARKER)!r}).touch()"
# Strings that would create MARKER if any of them reached generated or evaluated code.
PAYLOADS = [
    f"**({RUN} or {{}}), approximate",
    f"x=({RUN})",
    f"relu(); {RUN}; x.relu",
    f"__import__('os').system('touch {MARKER}')",
    f"0 if {RUN} else 1",
    "__class__.__base__.__base__.__call__",
    "__class__",
    "forward",
    "self",
    "class",
    "builtins.eval",
    "os.system",
    "torch.load",
    "torch.from_file",
]


@pytest.fixture(autouse=True)
def _no_marker():
    MARKER.unlink(missing_ok=True)
    yield
    assert not MARKER.exists(), "a saved string was executed"


def test_payloads_would_run_if_evaluated(tmp_path):
    """The marker is a real witness: the payload creates it when executed."""
    exec(RUN)   # noqa: S102 - the control experiment
    assert MARKER.exists()
    MARKER.unlink()


# -- architectures ------------------------------------------------------------------------------
class GeluTanh(nn.Module):
    """Every node kind with kwargs: F.gelu(approximate=...), a method with kwargs, a module."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(5, 6)
        self.act = nn.GELU(approximate="tanh")

    def forward(self, x):
        h = nn.functional.gelu(self.lin(x), approximate="tanh")
        return self.act(h).sum(dim=-1, keepdim=True)


def _grown():
    torch.manual_seed(0)
    model, inputs = zoo.mlp()
    gm = Grow(sites="all", width=2)(Deepen()(model, inputs), inputs)
    gm = Widen(widenable_pairs(gm)[0][0], factor=1.5)(gm, inputs)
    with torch.no_grad():
        for module in gm.modules():
            if isinstance(module, BypassBranch):
                module.B.normal_(0, 0.1)
                module.homotopy.fill_(0.25)
    return gm, inputs


def _traced(factory):
    def build():
        torch.manual_seed(0)
        model, inputs = factory()
        return private_copy(model, inputs), inputs
    return build


ARCHITECTURES = {
    "mlp": _traced(zoo.mlp),
    "cnn_bn": _traced(zoo.cnn_bn),
    "gelu_tanh": _traced(lambda: (GeluTanh(), (torch.randn(4, 5),))),
    "grown_deepened_widened": _grown,
}


def outputs(gm, inputs):
    """Outputs as loaded and in both modes (the module's own mode flags count)."""
    results = []
    for mode in (None, False, True):
        if mode is not None:
            gm.train(mode)
        with torch.no_grad():
            torch.manual_seed(0)
            results.append(gm(*inputs))
    return results


def identical(a, b, inputs) -> bool:
    same_state = a.state_dict().keys() == b.state_dict().keys() and all(
        torch.equal(a.state_dict()[k], b.state_dict()[k]) and
        a.state_dict()[k].dtype == b.state_dict()[k].dtype for k in a.state_dict())
    flags = [(n, m.training) for n, m in a.named_modules()] == \
        [(n, m.training) for n, m in b.named_modules()]
    grads = [(n, p.requires_grad) for n, p in a.named_parameters()] == \
        [(n, p.requires_grad) for n, p in b.named_parameters()]
    if not (same_state and flags and grads and a.code == b.code):
        return False
    try:
        theirs = outputs(copy.deepcopy(b), inputs)
    except Exception:   # noqa: BLE001 - a changed model may not run at all
        return False
    return all(torch.equal(x, y) for x, y in zip(outputs(copy.deepcopy(a), inputs), theirs,
                                                 strict=True))


@pytest.fixture(scope="module")
def saved():
    """name -> (directory, original graph, inputs, saved JSON document)."""
    root = Path(tempfile.mkdtemp(prefix="morphc-safety-"))
    table = {}
    for name, build in ARCHITECTURES.items():
        gm, inputs = build()
        paths = save(gm, root / name / "arch")
        table[name] = (root / name, gm, inputs, json.loads(paths["json"].read_text()))
    yield table
    shutil.rmtree(root, ignore_errors=True)


def _write(directory: Path, data) -> Path:
    (directory / "arch.json").write_text(json.dumps(data))
    return directory / "arch"


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_round_trip_is_bit_identical(saved, name):
    directory, gm, inputs, data = saved[name]
    assert identical(gm, load(_write(directory, data)), inputs)


# -- defect 1: kwargs keys reach the generated forward -------------------------------------------
def _nodes_with_kwargs(data):
    return [i for i, n in enumerate(data["nodes"]) if n["kwargs"]["dict"]]


@pytest.mark.parametrize("payload", PAYLOADS[:3])
def test_a_kwargs_key_payload_never_runs(saved, payload):
    directory, _, inputs, data = saved["gelu_tanh"]
    indices = _nodes_with_kwargs(data)
    assert {data["nodes"][i]["op"] for i in indices} >= {"call_function", "call_method"}
    for index in indices:
        bad = copy.deepcopy(data)
        pairs = bad["nodes"][index]["kwargs"]["dict"]
        pairs[0][0] = payload.replace("approximate", pairs[0][0])
        with pytest.raises(FormatError, match="keyword argument"):
            load(_write(directory, bad), check_digest=False)
        assert not MARKER.exists()


# -- defect 2: dunder targets patch classes ------------------------------------------------------
def test_a_dunder_target_cannot_patch_nn_module(saved):
    directory, _, _, data = saved["mlp"]
    call = nn.Module.__call__
    bad = copy.deepcopy(data)
    target = "__class__.__base__.__base__.__call__"
    bad["tensors"][target] = {"parameter": False, "requires_grad": False, "shape": [1],
                              "dtype": "float32"}
    bad["nodes"].insert(1, {"name": "leak", "op": "get_attr", "target": target,
                            "args": {"tuple": []}, "kwargs": {"dict": []}})
    with pytest.raises(FormatError, match="segment '__class__'"):
        load(_write(directory, bad), check_digest=False)
    assert nn.Module.__call__ is call
    for reserved in ("forward", "training", "graph", "0.forward"):
        renamed = copy.deepcopy(data)
        renamed["modules"][reserved] = renamed["modules"].pop("0")
        with pytest.raises(FormatError, match="segment"):
            load(_write(directory, renamed), check_digest=False)


# -- defect 3: silent defaults that change the function ------------------------------------------
def _branch(data):
    return next(spec for spec in data["modules"].values() if spec["class"] == "morphc.BypassBranch")


def _gelu_node(data):
    return next(n for n in data["nodes"] if n["kwargs"]["dict"])


MISSING = {
    "branch homotopy": lambda d: _branch(d).pop("homotopy"),
    "branch dtype": lambda d: _branch(d).pop("dtype"),
    "branch dtype null": lambda d: _branch(d).update(dtype=None),
    "module training": lambda d: d["modules"]["0"].pop("training"),
    "module kwargs entry": lambda d: d["modules"]["0"]["kwargs"].pop("bias"),
    "node kwargs": lambda d: d["nodes"][1].pop("kwargs"),
    "frozen": lambda d: d.pop("frozen"),
    "conv padding_mode": lambda d: next(s for s in d["modules"].values()
                                        if s["class"] == "morphc.BypassBranch"
                                        and s["kwargs"]["conv"])["kwargs"]["conv"].pop(
        "padding_mode"),
}


@pytest.mark.parametrize("what", list(MISSING))
def test_a_missing_field_is_an_error_not_a_default(saved, what):
    name = "cnn_grown" if what == "conv padding_mode" else "grown_deepened_widened"
    if name == "cnn_grown":
        torch.manual_seed(0)
        model, inputs = zoo.cnn_bn()
        gm = Grow(sites="all", width=2)(model, inputs)
        directory = saved["mlp"][0].parent / "cnn_grown"
        data = json.loads(save(gm, directory / "arch")["json"].read_text())
    else:
        directory, _, _, data = saved[name]
    bad = copy.deepcopy(data)
    MISSING[what](bad)
    with pytest.raises(FormatError):
        load(_write(directory, bad), check_digest=False)


SETTINGS = {
    "gelu module approximate": ("gelu_tanh", lambda d: d["modules"]["act"]["kwargs"].update(
        approximate="tanhh")),
    "F.gelu approximate": ("gelu_tanh", lambda d: _gelu_node(d)["kwargs"]["dict"][0].__setitem__(
        1, "bogus")),
    "branch kind": ("grown_deepened_widened", lambda d: _branch(d)["kwargs"].update(kind="lin")),
    "branch family": ("grown_deepened_widened", lambda d: _branch(d)["kwargs"].update(
        family="nope")),
    "padding mode": ("cnn_bn", lambda d: d["modules"]["conv1"]["kwargs"].update(
        padding_mode="mirror")),
    "bool as int": ("mlp", lambda d: d["modules"]["0"]["kwargs"].update(bias=1)),
    "dtype alias": ("mlp", lambda d: d["modules"]["0"].update(dtype="float")),
    "dtype differs from weights": ("mlp", lambda d: d["modules"]["0"].update(dtype="float64")),
    "homotopy out of range": ("grown_deepened_widened", lambda d: _branch(d).update(homotopy=2.0)),
    "unknown field": ("mlp", lambda d: d["modules"]["0"].update(init="zeros")),
}


@pytest.mark.parametrize("what", list(SETTINGS))
def test_settings_are_validated_at_load_not_at_forward(saved, what):
    name, mutate = SETTINGS[what]
    directory, _, _, data = saved[name]
    bad = copy.deepcopy(data)
    mutate(bad)
    with pytest.raises(FormatError):
        load(_write(directory, bad), check_digest=False)


def test_an_edited_file_is_refused_by_its_digest_and_validated_without_it(saved):
    directory, gm, inputs, data = saved["grown_deepened_widened"]
    edited = copy.deepcopy(data)
    _branch(edited)["homotopy"] = 0.5          # a valid, different model
    with pytest.raises(FormatError, match="does not match the digest"):
        load(_write(directory, edited))
    loaded = load(_write(directory, edited), check_digest=False)
    assert not identical(gm, loaded, inputs)


def test_weights_are_loaded_with_weights_only(saved, tmp_path):
    directory, gm, _, data = saved["mlp"]
    work = tmp_path / "w"
    shutil.copytree(directory, work)

    class Evil:
        def __reduce__(self):
            return (exec, (RUN,))

    torch.save({"0.weight": Evil()}, work / "arch.pt")
    with pytest.raises(FormatError, match="weights_only"):
        load(work / "arch", check_digest=False)


def test_huge_sizes_are_refused_before_allocating(saved):
    directory, _, _, data = saved["mlp"]
    bad = copy.deepcopy(data)
    bad["modules"]["0"]["kwargs"]["out_features"] = 10 ** 12
    with pytest.raises(FormatError, match="weights file has"):
        load(_write(directory, bad), check_digest=False)


def test_frozen_parameters_survive_a_round_trip(tmp_path):
    gm, inputs = _traced(zoo.mlp)()
    gm.get_parameter("0.weight").requires_grad_(False)
    loaded = load(save(gm, tmp_path / "frozen")["json"].with_suffix(""))
    assert not loaded.get_parameter("0.weight").requires_grad
    assert identical(gm, loaded, inputs)


# -- the fuzzer ----------------------------------------------------------------------------------
def _paths(value, prefix=()):
    """Every location in a JSON document: (path, kind) with kind "key" (a dict entry) or
    "item" (a list element)."""
    found = []
    if isinstance(value, dict):
        for key, inner in value.items():
            found.append((prefix + (key,), "key"))
            found += _paths(inner, prefix + (key,))
    elif isinstance(value, list):
        for index, inner in enumerate(value):
            found.append((prefix + (index,), "item"))
            found += _paths(inner, prefix + (index,))
    return found


REPLACEMENTS = [*PAYLOADS, None, True, False, 0, 1, -1, 2, 7, 2 ** 40, 0.5, 1.0, -0.0, 1e300,
                "", "x", "float64", "float16", "int64", "tanh", "none", "zeros", "relu", "0",
                "torch.nn.Linear", "torch.relu", "placeholder", "call_method", "output",
                [], [1], {}, {"node": "x"}, {"tuple": []}, {"dict": [["x", 1]]},
                {"float": "nan"}, {"torch": "float64"}, {"device": "meta"}]

MUTATIONS = ("delete", "replace", "rename_key", "tweak", "duplicate", "swap")


def _tweak(value):
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value * 2 + 1e-3
    if isinstance(value, str):
        return value + "_"
    return [value]


def mutate(data, path, kind, mutation, replacement):
    """A mutated deep copy, or None when the mutation does not apply to this location."""
    data = copy.deepcopy(data)
    *parents, last = path
    container = data
    for step in parents:
        container = container[step]
    if mutation == "delete":
        del container[last]
    elif mutation == "replace":
        container[last] = copy.deepcopy(replacement)
    elif mutation == "tweak":
        container[last] = _tweak(container[last])
    elif mutation == "rename_key" and kind == "key" and isinstance(replacement, str):
        container[replacement] = container.pop(last)
    elif mutation == "duplicate" and kind == "item":
        container.insert(last, copy.deepcopy(container[last]))
    elif mutation == "swap" and kind == "item" and last + 1 < len(container):
        container[last], container[last + 1] = container[last + 1], container[last]
    else:
        return None
    return data


def check_mutation(saved, name, index, mutation, replacement, check_digest):
    directory, gm, inputs, data = saved[name]
    paths = _paths(data)
    path, kind = paths[index % len(paths)]
    bad = mutate(data, path, kind, mutation, replacement)
    if bad is None:
        return "skipped"
    try:
        loaded = load(_write(directory, bad), check_digest=check_digest)
    except FormatError:
        outcome = "refused"
    else:
        outcome = "identical" if identical(gm, loaded, inputs) else "changed"
        if outcome == "changed":
            try:     # run whatever was generated, in both modes
                outputs(loaded, inputs)
            except Exception:   # noqa: BLE001 - a hand-edited model may fail at forward
                pass
    assert not MARKER.exists(), f"{mutation} at {path} with {replacement!r} ran code"
    if check_digest or (mutation == "delete" and kind == "key"):
        # untouched digest: a corrupted file is refused; a missing field never has a default
        assert outcome in ("identical", "refused", "skipped"), \
            f"{mutation} at {path} with {replacement!r} silently changed the model"
    return outcome


def _fuzz(max_examples):
    @settings(max_examples=max_examples, deadline=None, derandomize=False, print_blob=True,
              suppress_health_check=[HealthCheck.function_scoped_fixture,
                                     HealthCheck.too_slow])
    @given(name=st.sampled_from(sorted(ARCHITECTURES)), index=st.integers(0, 10 ** 6),
           mutation=st.sampled_from(MUTATIONS), replacement=st.sampled_from(REPLACEMENTS),
           check_digest=st.booleans())
    def run(saved, name, index, mutation, replacement, check_digest):
        check_mutation(saved, name, index, mutation, replacement, check_digest)
    return run


test_fuzz_saved_files = _fuzz(300)
test_fuzz_saved_files_many = pytest.mark.slow(_fuzz(5000))


def test_fuzz_reaches_every_field_and_every_outcome(saved):
    """The fuzzer's mutations are not vacuous: every location of every architecture, mutated
    with a payload and with a deletion, is refused; a re-ordering of equal nodes is caught."""
    outcomes = set()
    for name in ARCHITECTURES:
        count = len(_paths(saved[name][3]))
        for index in range(count):
            outcomes.add(check_mutation(saved, name, index, "delete", None, False))
            outcomes.add(check_mutation(saved, name, index, "replace", PAYLOADS[0], False))
    assert "refused" in outcomes and "changed" in outcomes


# -- contraction and moves: all-or-nothing -------------------------------------------------------
def _state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _bit_identical(module, state):
    now = module.state_dict()
    return now.keys() == state.keys() and all(
        torch.equal(now[k], v) and now[k].dtype == v.dtype for k, v in state.items())


def _trained_mlp(dtype=torch.float32):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).to(dtype)
    inputs = (torch.randn(5, 6, dtype=dtype),)
    ext = morphc.extend(model, inputs, sites="all", width=4)
    with torch.no_grad():
        for branch in ext.branches.values():
            branch.B.normal_(0, 0.5)
    ext.set_homotopy(0.0)
    return model, inputs, ext


def test_contract_refuses_a_nan_deviation_and_restores(monkeypatch):
    """relative_deviation is NaN when the folded outputs are not finite; ``not d <= tol``
    refuses it (``max`` used to ignore NaN and report 0)."""
    from morphc.compiler import contract as contract_module
    model, inputs, ext = _trained_mlp()
    before = _state(model)
    real = contract_module.deterministic_forward

    # the reference is the extended graph the fold rewrites; every other call is the folded one
    def nan_after_fold(module, *args, **kwargs):
        out = real(module, *args, **kwargs)
        return out * float("nan") if module is not ext.graph_module else out

    monkeypatch.setattr(contract_module, "deterministic_forward", nan_after_fold)
    with pytest.raises(morphc.ContractionError, match="deviates .* by nan"):
        morphc.contract(ext)
    assert _bit_identical(model, before) and not ext.contracted


def test_an_fp16_fold_that_overflows_after_the_cast_is_refused():
    model, inputs, ext = _trained_mlp(torch.float16)
    with torch.no_grad():
        branch = ext.branches["0"]
        branch.A.fill_(200.0)
        branch.B.fill_(200.0)          # W' = W + B·p·A ≈ 4e4 · 4 > 65504: finite in float64 only
    before = _state(model)
    with pytest.raises(morphc.ContractionError, match="non-finite.*float16"):
        morphc.contract(ext)
    assert _bit_identical(model, before) and not ext.contracted


def test_ungrow_writes_through_the_same_all_or_nothing_path():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).half()
    inputs = (torch.randn(5, 6, dtype=torch.float16),)
    grown = Grow(sites="all", width=4)(model, inputs)
    with torch.no_grad():
        for module in grown.modules():
            if isinstance(module, BypassBranch):
                module.A.fill_(200.0)
                module.B.fill_(200.0)
                module.homotopy.fill_(0.0)
    before = _state(grown)
    with pytest.raises(morphc.ContractionError, match="non-finite"):
        morphc.Ungrow()(grown, inputs)
    assert _bit_identical(grown, before)


def test_contract_after_the_user_replaced_a_submodule_is_refused():
    """Defect 6: extend, train, replace a submodule, contract → typed error, weights intact."""
    from tests.helpers import train_extension
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    inputs = (torch.randn(5, 6),)
    ext = morphc.extend(model, inputs, sites="all", width=4)
    train_extension(ext, inputs, steps=5)
    ext.set_homotopy(0.0)
    model[2] = nn.Linear(8, 3)
    before = _state(model)
    with pytest.raises(morphc.ContractionError, match="changed after morphc.extend"):
        morphc.contract(ext)
    assert _bit_identical(model, before)


def test_a_float32_deviation_is_measured_in_float64_before_blaming_the_fold(monkeypatch):
    from morphc.compiler import contract as contract_module
    model, inputs, ext = _trained_mlp()
    before = _state(model)
    monkeypatch.setitem(contract_module.VERIFY_TOLERANCE, "torch.float32", 0.0)
    with pytest.raises(morphc.ContractionError) as info:
        morphc.contract(ext)
    message = str(info.value)
    assert "in float64 deviates by only" in message and "bug" not in message
    assert _bit_identical(model, before)
    assert contract_module.float64_deviation(ext) <= 1e-12


# -- frozen parameters (defect 7) ----------------------------------------------------------------
def test_a_frozen_weight_is_not_a_site_unless_named():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    model[0].requires_grad_(False)
    inputs = (torch.randn(5, 6),)
    frozen = _state(model[0])
    for sites in ("all", "auto", r"\d", lambda site: True):
        ext = morphc.extend(model, inputs, sites=sites, width=2)
        assert [s.name for s in ext.sites] == ["2"], sites
    with pytest.raises(morphc.SiteError, match="only matches frozen"):
        morphc.extend(model, inputs, sites=r"[0]")   # a regex that only hits the frozen weight
    ext = morphc.extend(model, inputs, sites=["0"], width=2)     # named: extended and folded
    with torch.no_grad():
        ext.branches["0"].B.normal_(0, 0.5)
    ext.set_homotopy(0.0)
    morphc.contract(ext)
    assert not torch.equal(model[0].weight, frozen["weight"])


def test_auto_selection_leaves_frozen_layers_alone():
    """What the default Bypass does: ``sites="auto"`` over every candidate."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    model[0].requires_grad_(False)
    ext = morphc.extend(model, (torch.randn(5, 6),), top_k=2)
    assert [s.name for s in ext.sites] == ["2"]


# -- regex site patterns (defect 8) --------------------------------------------------------------
@pytest.mark.parametrize("pattern", [r"(layers\.\d+\.)+x", r"(a|aa)*b", r"(.*)*x", r"(\w)\1+"])
def test_a_pathological_pattern_answers_in_well_under_a_second(pattern):
    import time
    torch.manual_seed(0)
    model, inputs = zoo.transformer12()
    traced = morphc.trace(model, inputs)
    start = time.perf_counter()
    with pytest.raises(morphc.SiteError, match="exponential"):
        morphc.extend(model, inputs, sites=pattern, traced=traced)
    assert time.perf_counter() - start < 1.0


def test_safe_regexes_still_select():
    torch.manual_seed(0)
    model, inputs = zoo.transformer12()
    ext = morphc.extend(model, inputs, sites=r"layers\.1[01]\.linear\d", width=2)
    assert len(ext.sites) == 4


# -- typed errors (defect 9) ---------------------------------------------------------------------
def test_a_meta_device_model_gives_typed_errors():
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    inputs = (torch.randn(2, 4),)
    ext = morphc.extend(model, inputs, sites="all", width=2)
    ext.set_homotopy(0.0)
    meta = copy.deepcopy(model).to("meta")
    with pytest.raises(morphc.TraceError, match="meta device.*to_empty"):
        morphc.extend(meta, (torch.randn(2, 4, device="meta"),), sites="all")
    ext.to("meta")
    assert "homotopy=meta" in repr(ext)
    with pytest.raises(morphc.ContractionError, match="meta device"):
        morphc.contract(ext)


@pytest.mark.parametrize("width", [float("nan"), float("inf"), -1, -0.5, 0, 1.5, True, "8"])
def test_a_bad_width_is_a_site_error(width):
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    with pytest.raises(morphc.SiteError, match="width"):
        morphc.extend(model, (torch.randn(2, 4),), sites="all", width=width)


# -- messages that help (defect 11) --------------------------------------------------------------
def test_a_widen_across_dropout_is_not_offered_and_its_refusal_gives_working_advice():
    from morphc.space import ModelSpace
    from morphc.space.search import neighborhood
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Dropout(0.3), nn.Linear(8, 4),
                          nn.Tanh(), nn.Linear(4, 2))
    space = ModelSpace(model, (torch.randn(16, 6),))
    offered = [(m.first, m.second) for m in neighborhood(space.module()) if isinstance(m, Widen)]
    assert offered == [("3", "5")]
    for move in (Widen("3"), *(m for m in neighborhood(space.module()) if not isinstance(m, Widen)
                               and type(m).__name__ != "Grow")):
        space.apply(move)            # everything offered is accepted
    with pytest.raises(morphc.MoveError) as info:
        space.apply(Widen("0"))
    assert "dropout" in str(info.value) and "tolerance=" not in str(info.value)
