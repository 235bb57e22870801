"""Outside-in probes of the public API, second round: a model that is already extended handed to
``morphc.extend`` / ``morphc.Bypass`` / a trainer callback. Each test failed before its fix (the
call was accepted and extended the extension's own branches, or traced hooked branches into a
graph that kept them after they were folded); errors are typed and say what to pass instead."""

import pytest
import torch
from torch import nn

import morphc
from morphc.integrations import InPlaceExtension, TrainerBypass, module_sites


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))


def _sgd(params):
    return torch.optim.SGD(params, lr=0.1)


def _extended():
    model, x = _mlp(), torch.randn(16, 4)
    return model, x, morphc.extend(model, (x,), sites="all", width=2)


def test_extending_an_extended_model_says_to_pass_its_model_or_contract_first():
    # was accepted: sites 'graph_module.0', ... and the branch's own B extended as a site
    model, x, ext = _extended()
    with pytest.raises(morphc.TraceError, match=r"already extended") as info:
        morphc.extend(ext, (x,), sites="all")
    assert "ext.model" in str(info.value) and "morphc.contract(ext)" in str(info.value)
    again = morphc.extend(ext.model, (x,), sites="all")     # what the error says works
    assert [s.name for s in again.sites] == ["0", "2"] and torch.equal(again(x), model(x))


def test_extending_a_contracted_extension_names_the_model_contract_returned():
    # was "the model fails on the example inputs ... check the inputs' shapes and dtypes"
    model, x, ext = _extended()
    assert morphc.contract(ext) is model
    with pytest.raises(morphc.TraceError, match=r"already folded.*ext\.model"):
        morphc.extend(ext, (x,))


def test_a_model_holding_an_extension_as_a_submodule_is_refused_naming_it():
    _, x, ext = _extended()
    outer = nn.Sequential(ext, nn.Linear(1, 1))
    with pytest.raises(morphc.TraceError, match=r"submodule '0' is a morphc ExtendedModel"):
        morphc.extend(outer, (x,))


def test_bypass_on_an_extended_model_is_refused_before_anything_is_built():
    # was accepted: its cycles extended the extension, and finish() handed back the
    # ExtendedModel with the first branches still in it
    _, _, ext = _extended()
    with pytest.raises(morphc.BypassError, match=r"already extended.*ext\.model"):
        morphc.Bypass(ext, _sgd)


def test_bypass_on_a_compiled_extended_model_is_refused_too():
    _, _, ext = _extended()
    with pytest.raises(morphc.BypassError, match=r"already extended"):
        morphc.Bypass(torch.compile(ext), _sgd)


def _hooked():
    model, x = _mlp(), torch.randn(16, 4)
    table, modules = module_sites(model)
    hooked = InPlaceExtension(model, table.extendable(), modules, width=2)
    with torch.no_grad():
        for branch in hooked.branches.values():
            branch.B.normal_()      # the branch computes something
    return model, x, hooked


def test_extending_a_model_with_branches_hooked_in_place_is_refused():
    # was accepted (torch.export traced the hooks into the graph): once the branches were
    # removed the "extended" model still computed them, E1 off by 0.5
    model, x, hooked = _hooked()
    with pytest.raises(morphc.TraceError, match=r"hooked onto \['0', '2'\] in place"):
        morphc.extend(model, (x,), sites="all")
    with pytest.raises(morphc.BypassError, match=r"hooked onto"):
        morphc.Bypass(model, _sgd)
    hooked.remove()                  # the model is the user's again: extends as any other
    ext = morphc.extend(model, (x,), sites="all")
    assert torch.equal(ext(x), model(x))


def test_the_in_place_extension_object_itself_names_its_model():
    # was "morphc needs an nn.Module, got InPlaceExtension" / "Bypass trains an nn.Module"
    _, x, hooked = _hooked()
    with pytest.raises(morphc.TraceError, match=r"in-place extension.*ext\.model"):
        morphc.extend(hooked, (x,))
    with pytest.raises(morphc.BypassError, match=r"in-place extension"):
        morphc.Bypass(hooked, _sgd)


def test_a_trainer_callback_refuses_an_extended_model():
    # was accepted: module_sites found the graph module's layers and the branches' A and B
    _, _, ext = _extended()
    with pytest.raises(morphc.BypassError, match=r"already extended"):
        TrainerBypass().attach(ext, _sgd(ext.parameters()))
