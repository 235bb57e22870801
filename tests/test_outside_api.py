"""Outside-in probes of the public API: what a user passes that morphc did not expect (a
reentrant checkpoint, a BatchNorm with a cumulative average, a wrong argument to load, …).
Each test failed before its fix; errors are typed and say what to do."""

from pathlib import Path

import pytest
import torch
import torch.utils.checkpoint as checkpoint
from torch import nn

import morphc


class Checkpointed(nn.Module):
    def __init__(self, reentrant: bool):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.reentrant = nn.Linear(4, 4), nn.Linear(4, 2), reentrant

    def forward(self, x):
        h = checkpoint.checkpoint(self.a, x, use_reentrant=self.reentrant)
        return self.b(torch.tanh(h))


@pytest.mark.filterwarnings("ignore:None of the inputs have requires_grad")
@pytest.mark.parametrize("frontend", ["auto", "export"])
def test_a_reentrant_checkpoint_is_refused_naming_use_reentrant_false(frontend):
    # was a SiteError about "the higher-order op linear (wrap_with_set_grad_enabled)" that
    # never said what to change; torch.export's graph froze the layers after it too
    with pytest.raises(morphc.TraceError, match=r"use_reentrant=False") as info:
        morphc.trace(Checkpointed(True), (torch.randn(3, 4),), frontend=frontend, cache=False)
    assert "Checkpointed runs a inside" in str(info.value)


def test_the_non_reentrant_checkpoint_the_error_names_extends():
    model, x = Checkpointed(False), torch.randn(3, 4)
    ext = morphc.extend(model, (x,), sites=["a", "b"])
    assert torch.equal(ext(x), model(x))


def _cumulative_bn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8, momentum=None), nn.Tanh(),
                         nn.Linear(8, 2))


def test_batchnorm_with_a_cumulative_average_names_momentum_under_torch_export():
    # momentum=None computes 1 / num_batches_tracked as a Python float in training mode;
    # torch.export's data-dependent guard was reported as the model's "control flow"
    x = torch.randn(6, 4)
    with pytest.raises(morphc.TraceError, match=r"momentum=None") as info:
        morphc.trace(_cumulative_bn(), (x,), frontend="export", cache=False)
    assert "control flow" not in str(info.value) and "BatchNorm 1" in str(info.value)
    assert morphc.trace(_cumulative_bn().eval(), (x,), frontend="export",
                        cache=False).frontend == "export"


def test_batchnorm_with_a_cumulative_average_extends_and_contracts_exactly():
    # symbolic_trace keeps BatchNorm a layer: E1 and C1 as for any BatchNorm, statistics too
    model, x = _cumulative_bn(), torch.randn(6, 4)
    plain = _cumulative_bn()
    ext = morphc.extend(model, (x,), sites=["0", "3"])
    assert torch.equal(ext(x), plain(x))
    assert torch.equal(model[1].running_var, plain[1].running_var)
    assert int(model[1].num_batches_tracked) == int(plain[1].num_batches_tracked)
    with torch.no_grad():
        for p in ext.extension_parameters():
            p.add_(0.1 * torch.randn_like(p))
    ext.set_homotopy(0.0)
    ext.eval()
    expected = ext(x)
    folded = morphc.contract(ext)
    assert folded is model
    torch.testing.assert_close(folded.eval()(x), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("prefix", [None, 3, b"runs/model", ["runs/model"], "", Path("")])
def test_load_given_no_path_says_what_it_expects(prefix):
    # a bare TypeError ("expected str, bytes or os.PathLike object, not NoneType") or
    # ValueError ("PosixPath('.') has an empty name") from pathlib
    with pytest.raises(morphc.FormatError, match=r"expected a path prefix .*<prefix>\.json"):
        morphc.load(prefix)


def test_save_with_its_arguments_swapped_says_the_model_comes_first():
    with pytest.raises(morphc.FormatError, match=r"takes the model first"):
        morphc.save("runs/model", nn.Linear(2, 2))


FACTORY = """
import torch
from torch import nn

def make():
    print("factory called")
    return nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)), (torch.randn(3, 4),)
"""


@pytest.mark.parametrize("option", ["--json", "--dot", "--html", "--svg"])
def test_cli_inspect_checks_its_output_paths_before_tracing(tmp_path, capsys, option):
    # an output under a file (or a directory given as the file) failed only after the model
    # was loaded, traced and extended
    from morphc.tools import cli

    (tmp_path / "models.py").write_text(FACTORY)
    (tmp_path / "file").write_text("")
    for out in (tmp_path / "file" / "r.out", tmp_path):
        assert cli.main(["inspect", f"{tmp_path / 'models.py'}:make", "--extend",
                         option, str(out)]) == 1
        captured = capsys.readouterr()
        assert "factory called" not in captured.out, "refused before the model was made"
        assert captured.err.startswith(f"morphc: error: cannot write to {option} {out}: ")


# -- probes: odd arguments to the public API ----------------------------------------------------
def test_extend_with_kwargs_that_are_not_a_dict_says_what_kwargs_are():
    # dict([1]) in trace: "cannot convert dictionary update sequence element #0 to a sequence"
    with pytest.raises(morphc.TraceError, match=r"keyword inputs by name, a dict"):
        morphc.extend(nn.Linear(4, 2), (torch.randn(3, 4),), kwargs=[1])


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
def test_a_zero_size_layer_is_an_explained_exclusion_not_a_zero_division():
    # nn.Linear(0, 2) was a site 'ok' in inspect and extend died in the branch's init
    # (ZeroDivisionError: the fan-in of A was 0)
    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Linear(4, 0), nn.Linear(0, 2), nn.Linear(2, 3)), torch.randn(3, 4)
    rows = {row.name: row for row in morphc.inspect(model, (x,)).rows}
    assert "no elements" in rows["0"].excluded and "no elements" in rows["1"].excluded
    ext = morphc.extend(model, (x,))
    assert [s.name for s in ext.sites] == ["2"] and torch.equal(ext(x), model(x))
    with pytest.raises(morphc.SiteError, match=r"no elements"):
        morphc.extend(nn.Linear(0, 2), (torch.randn(3, 0),))


def test_extend_with_a_dynamic_shapes_that_is_no_spec_is_not_blamed_on_control_flow():
    # torch.export's AssertionError was wrapped in "data-dependent Python control flow ..."
    with pytest.raises(morphc.TraceError, match=r"dynamic_shapes is torch.export's spec") as info:
        morphc.extend(nn.Linear(4, 2), (torch.randn(3, 4),), dynamic_shapes="batch")
    assert "control flow" not in str(info.value)


def test_bypass_with_an_empty_site_list_is_refused_at_construction():
    # every cycle failed instead, with a warning naming "<function CycleStart._extend.<locals>
    # .<lambda>>" as the site selection
    model = nn.Sequential(nn.Linear(4, 2))
    with pytest.raises(morphc.SiteError, match=r"sites=\[\] selects no site"):
        morphc.Bypass(model, torch.optim.SGD(model.parameters(), lr=0.1), sites=[])


def test_extending_a_model_space_says_which_of_its_models_to_pass():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
    space = morphc.ModelSpace(model, (torch.randn(2, 3),))
    with pytest.raises(morphc.TraceError, match=r"space\.module\(node\)"):
        morphc.extend(space, (torch.randn(2, 3),))
    with pytest.raises(morphc.TraceError, match="needs an nn.Module, got list$"):
        morphc.extend([model], (torch.randn(2, 3),))
    assert morphc.extend(space.module(), (torch.randn(2, 3),)).model is space.module()
