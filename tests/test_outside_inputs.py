"""Probes of the public API with models and inputs an outside user brings: each one either keeps
the invariants (E1 bit for bit, C1 into the user's own Parameters) or fails at once, typed."""

import io
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import morphc
from tests.helpers import max_rel, train_extension


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))


def _extend_and_fold(model, x, width=4, frontend="auto"):
    """E1 at extension, then C1 after training the branches: returns (ext, folded output,
    extended output at s = 0)."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        expected = model(x)
    ext = morphc.extend(model, (x,), sites="all", width=width, frontend=frontend)
    with torch.no_grad():
        assert torch.equal(ext(x), expected)
    train_extension(ext, (x,))
    ext.set_homotopy(0.0)
    with torch.no_grad():
        extended = ext(x)
    assert morphc.contract(ext) is model
    assert all(p is params[n] for n, p in model.named_parameters())
    with torch.no_grad():
        return ext, model(x), extended


def _scale_output(module, args, output):
    return output * 2


def _scale_input(module, args):
    return (args[0] * 3,)


@pytest.mark.parametrize("where", ["root", "site"])
@pytest.mark.parametrize("hook", ["forward", "pre"])
def test_forward_hooks_are_part_of_the_function(where, hook):
    """A forward hook that changes what a module computes is part of the model's function:
    on the model itself symbolic_trace used to drop it (E1 broke silently), on a site's module
    the branch bypassed it (the fold was refused as 'a morphc bug')."""
    model = _mlp()
    target = model if where == "root" else model[2]
    if hook == "forward":
        target.register_forward_hook(_scale_output)
    else:
        target.register_forward_pre_hook(_scale_input)
    ext, folded, extended = _extend_and_fold(model, torch.randn(5, 8))
    assert max_rel(folded, extended) < 1e-6
    assert any("hooks" in note for note in ext.traced.notes)


def test_hook_added_after_a_trace_is_not_served_from_the_cache():
    model, x = _mlp(), torch.randn(5, 8)
    morphc.extend(model, (x,), sites="all")
    model.register_forward_hook(_scale_output)
    with torch.no_grad():
        expected = model(x)
        assert torch.equal(morphc.extend(model, (x,), sites="all")(x), expected)


class _Transposed(nn.Module):
    """Parameters stored (in, out) or (out, in) and read through each spelling of a transpose."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Parameter(torch.randn(6, 8)), nn.Parameter(torch.randn(6, 6))
        self.c, self.d = nn.Parameter(torch.randn(6, 6)), nn.Parameter(torch.randn(6, 6))
        self.e, self.f = nn.Parameter(torch.randn(6, 6)), nn.Parameter(torch.randn(6, 3))
        self.bias = nn.Parameter(torch.randn(6))

    def forward(self, x):
        h = torch.tanh(x @ self.a.T)
        h = torch.tanh(h @ self.b.transpose(0, 1))
        h = torch.tanh(h @ self.c.mT)
        h = torch.tanh(h @ self.d.permute(1, 0))
        h = torch.tanh(nn.functional.linear(h, torch.transpose(self.e, -1, -2), self.bias))
        return nn.functional.linear(h, self.f.t())


@pytest.mark.parametrize("frontend", ["symbolic_trace", "export"])
def test_a_transposed_parameter_is_a_site_however_it_is_spelled(frontend):
    """``x @ W.T``, ``W.transpose(0, 1)``, ``W.mT``, ``W.permute(1, 0)`` and ``F.linear(x, W.t())``
    are linear maps by a parameter; only ``.t()`` under ``@`` used to be recognised."""
    ext, folded, extended = _extend_and_fold(_Transposed(), torch.randn(5, 8), width=3,
                                             frontend=frontend)
    assert sorted(s.weight_name for s in ext.sites) == ["a", "b", "c", "d", "e", "f"]
    assert max_rel(folded, extended) < 1e-6


def test_a_weight_computed_by_other_code_is_explained_without_blaming_spectral_norm():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.w, self.s = nn.Parameter(torch.randn(6, 8)), nn.Parameter(torch.ones(6, 1))

        def forward(self, x):
            return nn.functional.linear(x, self.w * self.s)

    with pytest.raises(morphc.SiteError, match=r"computed from it by other code \(mul\)") as err:
        morphc.extend(Scaled(), (torch.randn(2, 8),), sites="all")
    assert "spectral_norm divides" not in str(err.value)


def _adam(params):
    return torch.optim.Adam(params, lr=1e-2)


@pytest.mark.parametrize(("options", "error", "match"), [
    ({"activation": "nope"}, morphc.FamilyError, "known: "),
    ({"width": 0}, morphc.SiteError, "width"),
    ({"width": -2}, morphc.SiteError, "width"),
    ({"width": 1.5}, morphc.SiteError, "fraction"),
    ({"width": float("nan")}, morphc.SiteError, "width"),
    ({"width": "8"}, morphc.SiteError, "width"),
    ({"overrides": {"0": {"widht": 2}}}, morphc.SiteError, "keys among"),
    ({"overrides": {"0": {"activation": "nope"}}}, morphc.FamilyError, "known: "),
    ({"overrides": {"0": {"width": 0}}}, morphc.SiteError, "width"),
])
def test_bypass_refuses_bad_branch_settings_at_construction(options, error, match):
    """These used to pass construction and fail at the first cycle, which then disabled Bypass
    for the rest of the run with only a warning."""
    with pytest.raises(error, match=match):
        morphc.Bypass(_mlp(), _adam, **options)


def test_trainer_callbacks_refuse_bad_branch_settings_at_construction():
    from morphc.integrations.core import TrainerBypass

    with pytest.raises(morphc.FamilyError, match="known: "):
        TrainerBypass(activation="nope")
    with pytest.raises(morphc.SiteError, match="width"):
        TrainerBypass(width=-1)


@pytest.mark.parametrize("sites", [None, 0, [0], b"0"])
def test_a_site_selection_of_the_wrong_type_is_a_site_error(sites):
    with pytest.raises(morphc.SiteError, match="a predicate"):
        morphc.extend(_mlp(), (torch.randn(2, 8),), sites=sites)
    with pytest.raises(morphc.SiteError, match="a predicate"):
        morphc.Bypass(_mlp(), _adam, sites=sites)


def _bypass_sites(bp, x):
    """The sites the first cycle of ``bp`` extends."""
    for _ in range(3):
        bp.step(lambda m: m(x).pow(2).mean())
    names = list(bp.extended.config.sites)
    bp.finish()
    return names


def test_exclude_given_as_one_string_is_one_pattern():
    """``exclude="2"`` excludes site 2 (a plain string was split into one pattern per
    character: ``exclude="fc"`` excluded sites named 'f' and 'c', and never 'fc')."""
    model, x = _mlp(), torch.randn(4, 8)
    model.add_module("fc", nn.Linear(2, 2))
    model.add_module("f", nn.Linear(2, 2))
    ext = morphc.extend(model, (x,), sites="all", exclude="fc")
    assert [s.name for s in ext.sites] == ["0", "2", "f"]
    bp = morphc.Bypass(model, _adam, trigger=morphc.Schedule(every=2), bypass_steps=4,
                       return_steps=4, verbose=False, exclude="fc", example_inputs=(x,))
    assert _bypass_sites(bp, x) == ["0", "2", "f"]


class _OptionalBias(nn.Module):
    """An optional tensor input the forward tests against None: symbolic_trace cannot take it
    (it bakes the test), so torch.export traces it."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 2)

    def forward(self, x, bias=None):
        h = self.a(x)
        if bias is not None:
            h = h + bias
        return self.b(h)


_EXAMPLES = {"omitted": ((), {}), "None": ((None,), {}), "kw-None": ((), {"bias": None})}
_CALLS = {"tensor": ((True,), {}), "kw-tensor": ((), {"bias": True}), "None": ((None,), {}),
          "omitted": ((), {})}


@pytest.mark.parametrize(("example", "call"), [
    (e, c) for e in _EXAMPLES for c in _CALLS
    # a keyword example called positionally: compiler/shape_graphs.py fills the example's
    # keyword in again when it traces anew (reported, not in this change)
    if not (e == "kw-None" and c in ("tensor", "None"))])
def test_an_optional_input_the_example_left_none_can_be_given_later(example, call):
    """The exported graph bakes ``bias is None``: given a tensor it used to raise a bare
    TypeError, or (example ``(x, None)``) silently ignore the tensor; now the call is refused
    as a ShapeError and the extended model traces the model again for it."""
    (ex_args, ex_kwargs), (call_args, call_kwargs) = _EXAMPLES[example], _CALLS[call]
    model, x, bias = _OptionalBias(), torch.randn(4, 8), torch.randn(8)
    ext = morphc.extend(model, (x, *ex_args), kwargs=ex_kwargs, sites="all")
    assert ext.traced.frontend == "export"

    def given(values):
        return [bias if v is True else v for v in values]

    args = (x, *given(call_args))
    kwargs = dict(zip(call_kwargs, given(call_kwargs.values()), strict=True))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")        # "traced its model again": expected here
        assert torch.equal(ext(*args, **kwargs), model(*args, **kwargs))


def _bypass(model, **options):
    return morphc.Bypass(model, _adam, trigger=morphc.Schedule(every=3), bypass_steps=4,
                         return_steps=4, verbose=False, **options)


@pytest.mark.parametrize("bad", ["other-architecture", "missing-keys", "not-a-dict"])
def test_bypass_refuses_a_foreign_checkpoint_before_loading_anything(bad):
    """A checkpoint of another architecture used to load every matching tensor into the model
    and then raise torch's RuntimeError (missing keys: a KeyError)."""
    x = torch.randn(16, 8)
    saved = _bypass(_mlp())
    for _ in range(5):
        saved.step(lambda m: m(x).pow(2).mean())
    state = saved.state_dict()
    saved.finish()
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    if bad == "missing-keys":
        model, state = _mlp(), {"version": state["version"]}
    elif bad == "not-a-dict":
        state = [state]
    bp = _bypass(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(morphc.BypassError, match="checkpoint"):
        bp.load_state_dict(state)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_inputs_given_through_var_keyword_are_traced():
    """A forward ``(self, x, **kw)`` given ``kwargs={"m": ...}``: torch.export refuses any
    dynamic_shapes for ``kw`` (an internal assertion), so extend used to fail with a TraceError
    about data-dependent control flow. It now traces static shapes and traces again for others."""
    class Gated(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.a = nn.Linear(8, 8)

        def forward(self, x, **kw):
            return self.a(x) * kw["m"] * kw.get("scale", 1.0)

    model = Gated()
    ext = morphc.extend(model, (torch.randn(4, 8),),
                        kwargs={"m": torch.rand(4, 1), "scale": 2.0}, sites="all")
    assert any("**kwargs" in note for note in ext.traced.notes)
    for batch in (4, 6):
        x, m = torch.randn(batch, 8), torch.rand(batch, 1)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")        # "traced its model again": expected at 6
            assert torch.equal(ext(x, m=m, scale=2.0), model(x, m=m, scale=2.0))


class _FunctionalDropout(nn.Module):
    """Reads its own mode as a value, the way most research code writes dropout."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 2)

    def forward(self, x):
        return self.b(nn.functional.dropout(torch.relu(self.a(x)), 0.5, self.training))


@pytest.mark.parametrize("traced_in", ["train", "eval"])
def test_the_extended_model_follows_train_and_eval_when_the_forward_reads_self_training(
        traced_in):
    """symbolic_trace read ``self.training`` once, as a constant: after ``ext.eval()`` the
    extended model kept dropping out (or, traced in eval, never did), silently unlike the
    user's model in the same mode."""
    model, x = _FunctionalDropout().train(traced_in == "train"), torch.randn(6, 8)
    ext = morphc.extend(model, (x,), sites="all")
    assert ext.traced.frontend == "symbolic_trace"
    for mode in (traced_in != "train", traced_in == "train"):
        ext.train(mode)
        model.train(mode)
        with torch.no_grad():
            torch.manual_seed(3)
            got = ext(x)
            torch.manual_seed(3)
            assert torch.equal(got, model(x))


def test_a_saved_graph_stores_the_mode_it_was_saved_in(tmp_path):
    model, x = _FunctionalDropout().eval(), torch.randn(6, 8)
    graph = morphc.trace(model, (x,)).graph_module
    morphc.save(graph, tmp_path / "g")
    loaded = morphc.load(tmp_path / "g")
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_in_place_extension_runs_before_the_users_own_forward_hooks():
    """The trainer integrations add the branch with a forward hook. Registered after a user's
    hook that rescales the output, it added an unscaled branch, so the fold (which the user's
    hook rescales) changed the function and every cycle was refused."""
    from morphc.integrations.extension import InPlaceExtension
    from morphc.integrations.sites import module_sites

    model, x = _mlp(), torch.randn(5, 8)
    model[0].register_forward_hook(_scale_output)
    table, modules = module_sites(model)
    ext = InPlaceExtension(model, table.extendable(), modules, width=3)
    with torch.no_grad():
        for param in ext.parameters():
            param.add_(torch.randn_like(param) * 0.3)
    ext.set_homotopy(0.0)
    with torch.no_grad():
        extended = model(x)
        assert ext.fold() < 1e-6
        assert max_rel(model(x), extended) < 1e-6


@pytest.mark.parametrize("options", [{"sites": ["nope"]}, {"sites": "layer.*"},
                                     {"exclude": ["0", "2"]}])
def test_bypass_with_example_inputs_refuses_site_names_that_match_nothing(options):
    """Found only when the first cycle extended, such a selection ended Bypass for the run."""
    with pytest.raises(morphc.SiteError, match="sites in this model: 0, 2"):
        morphc.Bypass(_mlp(), _adam, example_inputs=(torch.randn(4, 8),), **options)


class _Masked(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 1)

    def forward(self, x, mask):
        return self.b(torch.tanh(self.a(x)) * mask)


def test_bypass_resumes_mid_cycle_on_a_model_called_with_keyword_inputs():
    """The checkpoint kept the positional inputs the closure passed but not the keyword ones,
    so resuming mid-cycle re-traced without them and failed."""
    x, y = torch.randn(16, 8), torch.randn(16, 1)
    mask = (torch.rand(16, 1) > 0.2).float()

    def closure(m):
        return nn.functional.mse_loss(m(x, mask=mask), y)

    first = _bypass(_Masked())
    for _ in range(5):
        first.step(closure)
    assert first.phase != "train"
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    resumed = _bypass(_Masked())
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert [float(first.step(closure)) for _ in range(6)] == \
        [float(resumed.step(closure)) for _ in range(6)]
    first.finish()
    resumed.finish()


def test_a_forward_that_branches_on_self_training_is_noted():
    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 2)

        def forward(self, x):
            h = self.a(x)
            return self.b(h) if self.training else self.b(torch.relu(h))

    ext = morphc.extend(TwoHeads(), (torch.randn(3, 8),), sites="all")
    assert any("branches on self.training" in n for n in ext.traced.notes)
    plain = morphc.extend(_mlp(), (torch.randn(3, 8),), sites="all")
    assert not any("self.training" in n for n in plain.traced.notes)


@pytest.mark.parametrize("make", [
    lambda: morphc.Plateau(window=0), lambda: morphc.Plateau(window=2.5),
    lambda: morphc.Plateau(threshold=float("nan")), lambda: morphc.Plateau(floor=float("nan")),
    lambda: morphc.GradientNorm(threshold=-1.0), lambda: morphc.GradientNorm(smoothing=1.0),
    lambda: morphc.GradientNorm(patience=0), lambda: morphc.Schedule(every=0),
    lambda: morphc.Schedule(every=2.5), lambda: morphc.AnyOf(),
    lambda: morphc.AnyOf(morphc.Schedule(every=2), 3),
], ids=["window0", "window-float", "threshold-nan", "floor-nan", "gradnorm-threshold",
        "smoothing1", "patience0", "every0", "every-float", "anyof-empty", "anyof-int"])
def test_bad_trigger_settings_are_typed_morphc_errors(make):
    """They were bare ValueErrors, or accepted (a trigger that never fires), or an
    AttributeError on the first step (``AnyOf(..., 3)``)."""
    with pytest.raises(morphc.BypassError) as err:
        make()
    assert isinstance(err.value, ValueError)


def test_plateau_fires_on_a_negative_loss_that_has_stopped_improving():
    """A Gaussian negative log-likelihood plateaus below 0; the default floor of 0 kept
    Plateau from ever firing there (and never mattered for a loss >= 0)."""
    trigger = morphc.Plateau(window=5)
    assert any(trigger.update(-5.0, step=i) for i in range(20))
    floored = morphc.Plateau(window=5, floor=-1.0)
    assert not any(floored.update(-5.0, step=i) for i in range(20))


@pytest.mark.parametrize("norm", ["spectral_norm", "weight_norm"])
def test_the_old_weight_computing_hooks_stay_at_run_time(norm):
    """``torch.nn.utils.spectral_norm`` / ``weight_norm`` (the pre-parametrization API) keep the
    weight up to date with a forward pre-hook. Traced into the graph (as other hooks are), the
    power iteration lost its no_grad and every training-mode call failed."""
    wrap = getattr(torch.nn.utils, norm)
    torch.manual_seed(0)
    model = nn.Sequential(wrap(nn.Linear(8, 16)), nn.ReLU(), nn.Linear(16, 2))
    x = torch.randn(4, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")              # the old API is deprecated
        state = {k: v.clone() for k, v in model.state_dict().items()}
        ext = morphc.extend(model, (x,), sites="all")
        model.load_state_dict(state)                 # the power iteration moves u: start alike
        expected = model(x)
        model.load_state_dict(state)
        assert torch.equal(ext(x), expected)


def _bn_bypass():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 1))
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    bp = morphc.Bypass(model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9),
                       trigger=morphc.Schedule(every=3), bypass_steps=5, return_steps=5,
                       verbose=False)

    def broken(m):
        m(x)                      # BatchNorm's statistics move in this forward
        raise ZeroDivisionError("a bug in the user's closure")

    return model, bp, (lambda m: F.mse_loss(m(x), y)), broken


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_a_closure_that_raises_in_a_plain_step_leaves_buffers_as_they_were():
    model, bp, good, broken = _bn_bypass()
    bp.step(good)
    before = _state(model)
    with pytest.raises(ZeroDivisionError):
        bp.step(broken)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_closure_that_raises_mid_cycle_restores_the_pre_cycle_state_bit_for_bit():
    model, bp, good, broken = _bn_bypass()
    while bp.phase != "bypass":
        bp.step(good)
    before_cycle = _state(model)
    bp.step(good)
    bp.step(good)
    with pytest.raises(ZeroDivisionError):
        bp.step(broken)
    assert bp.phase == "train"
    assert all(torch.equal(before_cycle[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("bad", [2.0, -0.1, float("nan"), "0", True, None])
def test_set_homotopy_refuses_what_is_not_a_number_in_0_1_typed(bad):
    ext = morphc.extend(nn.Sequential(nn.Linear(3, 2)), (torch.randn(4, 3),))
    with pytest.raises(morphc.MorphcError, match=r"\[0, 1\]") as info:
        ext.set_homotopy(bad)
    assert isinstance(info.value, ValueError) and ext.homotopy == 1.0
    ext.set_homotopy(torch.tensor(0.25))
    assert ext.homotopy == 0.25


@pytest.mark.parametrize("overrides, says", [({"nope": {"width": 2}}, "no site"),
                                             ({"0": {"widht": 2}}, "keys among"),
                                             ({"0": 3}, "keys among")])
def test_extend_refuses_overrides_that_would_be_ignored(overrides, says):
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
    with pytest.raises(morphc.SiteError, match=says):
        morphc.extend(model, (torch.randn(2, 3),), sites="all", overrides=overrides)
    ext = morphc.extend(model, (torch.randn(2, 3),), sites="all", overrides={"0": {"width": 2},
                                                                          "2.weight": {"width": 3}})
    assert ext.config.widths == {"0": 2, "2": 3}


@pytest.mark.parametrize("probe", [lambda m: 1.0, lambda m: m(torch.randn(2, 3)),
                                   lambda m: m(torch.randn(2, 3)).sum().detach()])
def test_auto_sites_refuse_a_probe_that_is_not_a_scalar_loss_with_autograd(probe):
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
    with pytest.raises(morphc.SiteError, match="probe"):
        morphc.extend(model, (torch.randn(2, 3),), sites="auto", probe=probe)


@pytest.mark.parametrize("top_k", [0, -1, 1.5])
def test_top_k_below_one_is_refused_not_read_as_half_or_all_but_one(top_k):
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
    with pytest.raises(morphc.SiteError, match="top_k"):
        morphc.extend(model, (torch.randn(2, 3),), sites="auto", top_k=top_k)
    with pytest.raises(morphc.BypassError, match="top_k"):
        morphc.Bypass(model, torch.optim.SGD(model.parameters(), lr=0.1), sites="auto",
                      top_k=top_k)


class _OptionalBias4(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 4)

    def forward(self, x, bias=None):
        y = self.linear(x)
        return y if bias is None else y + bias


def test_an_optional_input_given_positionally_later_is_traced_again_not_refused():
    model, x, bias = _OptionalBias4(), torch.randn(3, 4), torch.randn(3, 4)
    ext = morphc.extend(model, (x,), kwargs={"bias": None}, sites="all")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert torch.equal(ext(x, bias), model(x, bias))
    assert len(ext.retraces) == 1


def test_a_non_finite_weight_is_named_instead_of_blaming_the_batch():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
    x, y = torch.randn(8, 3), torch.randn(8, 1)
    bp = morphc.Bypass(model, torch.optim.SGD(model.parameters(), lr=0.1), verbose=False,
                       on_failure="raise")
    bp.step(lambda m: F.mse_loss(m(x), y))
    with torch.no_grad():
        model[2].weight[0, 1] = float("inf")
    with pytest.raises(morphc.BypassError, match=r"'2\.weight' is itself not finite"):
        bp.step(lambda m: F.mse_loss(m(x), y))
    x[0, 0] = float("nan")                          # a bad batch is still called a bad batch
    with torch.no_grad():
        model[2].weight[0, 1] = 0.0
    with pytest.raises(morphc.BypassError, match="check this batch"):
        bp.step(lambda m: F.mse_loss(m(x), y))


class _DropoutNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.5),
                                 nn.Linear(8, 2))

    def forward(self, x):
        return self.net(x)


def test_an_exported_extension_follows_eval_and_train_like_the_model():
    model, x = _DropoutNorm(), torch.randn(16, 6)
    ext = morphc.extend(model, (x,), sites="all", frontend="export")     # captured in train
    assert ext.traced.frontend == "export" and ext.traced.training
    model.eval()
    ext.eval()
    with torch.no_grad():
        assert torch.equal(ext(x), model(x)), "eval: no dropout, running statistics"
        assert torch.equal(ext(x[:5]), model(x[:5])), "and other batch sizes"
    ext.train()
    model.train()
    torch.manual_seed(0)
    with torch.no_grad():
        train_out = ext(x)
    torch.manual_seed(0)
    with torch.no_grad():
        assert torch.equal(train_out, model(x)), "train: the same dropout masks"
    train_extension(ext, (x,))
    ext.set_homotopy(0.0)
    ext.eval()
    model.eval()
    with torch.no_grad():
        extended = ext(x)
    assert morphc.contract(ext) is model
    with torch.no_grad():
        assert max_rel(model(x), extended) < 1e-5
