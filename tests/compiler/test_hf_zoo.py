"""The models people bring: tiny Hugging Face architectures (random weights, no downloads).

For every architecture of ``morphc.bench.hf_zoo.ZOO``: sites + listed exclusions cover every
linear-operator weight; E1 (extended == original) and exact contraction after perturbing the
branches (C1), on the example shapes, on another batch size and on another sequence length /
image size / audio length. Where the model itself refuses a size, the extended model refuses it
with a ``ShapeError`` that names the input and the dimension; where only torch.export fixed or
guarded it, the extended model traces the model again at that size, with the same branches.
"""

import os
import time

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("transformers")

import torch  # noqa: E402

import morphc  # noqa: E402
from morphc.bench.hf_zoo import ZOO  # noqa: E402
from morphc.compiler.deviation import relative_deviation  # noqa: E402
from tests.ir.test_sites import linear_operator_weights  # noqa: E402

SIZE_INPUT = {"seq": "input_ids", "image": "pixel_values", "audio": "input_values"}


def _first(output) -> torch.Tensor:
    """The model's main output (logits / last_hidden_state): the first tensor leaf."""
    return next(t for t in torch.utils._pytree.tree_leaves(output) if isinstance(t, torch.Tensor))


def _shapes(entry) -> dict[str, tuple[int, int]]:
    (b0, s0), (b1, s1) = entry.default, entry.alt
    return {"example": (b0, s0), "batch": (b1, s0), "size": (b0, s1)}


def _run(module, entry, shape):
    args, kwargs = entry.inputs(*shape)
    with torch.no_grad():
        return _first(module(*args, **kwargs))


def _extend(entry):
    model, args, kwargs = entry.build()
    ext = morphc.extend(model, args, kwargs=kwargs, dynamic_shapes=entry.dynamic_shapes,
                        sites="all", width=3, seed=1, **(entry.options or {}))
    return model, ext


def _params(names):
    return [pytest.param(n, marks=pytest.mark.slow) if ZOO[n].slow else n for n in names]


@pytest.mark.parametrize("name", _params(ZOO))
def test_hf_model_preserves_function_and_contracts_exactly(name):
    entry = ZOO[name]
    model, ext = _extend(entry)
    missing = linear_operator_weights(model) - ext.site_table.covered()
    assert not missing, f"linear weights neither sites nor listed exclusions: {missing}"
    shapes = _shapes(entry)
    if entry.alt_size == "model":        # this size cannot vary: refused, typed, with the why
        size_input = "input_features" if name == "whisper_encoder" else SIZE_INPUT[
            entry.size_kind]
        with pytest.raises(morphc.ShapeError, match=f"input '{size_input}', dimension") as info:
            _run(ext, entry, shapes.pop("size"))
        assert "dynamic_shapes" in str(info.value)
    for label, shape in shapes.items():                                            # E1
        assert relative_deviation(_run(model, entry, shape), _run(ext, entry, shape)) <= 1e-6, \
            label
    assert bool(ext.retraces) == (entry.alt_size == "graph"), ext.retraces
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for branch in ext.branches.values():
            branch.B.copy_(torch.randn(branch.B.shape, generator=generator) * 0.05)
    ext.set_homotopy(0.0)
    expected = {label: _run(ext, entry, shape) for label, shape in shapes.items()}
    assert relative_deviation(_run(model, entry, shapes["example"]), expected["example"]) > 1e-4
    assert morphc.contract(ext) is model
    for label, shape in shapes.items():                                            # C1
        assert relative_deviation(expected[label], _run(model, entry, shape)) <= 1e-5, label


def test_default_use_cache_is_traced_without_cache_and_explicit_true_is_refused():
    entry = ZOO["llama_cache"]
    model, args, kwargs = entry.build()
    ext = morphc.extend(model, args, kwargs=kwargs, sites="all", width=2)
    assert any("use_cache=False" in note for note in ext.traced.notes)
    with pytest.raises(morphc.TraceError, match="pass use_cache=False"):
        morphc.extend(model, args, kwargs={**kwargs, "use_cache": True}, sites="all")


def test_shape_outside_the_graph_range_is_a_typed_error():
    entry = ZOO["bert"]
    _, ext = _extend(entry)
    with pytest.raises(morphc.ShapeError, match=r"input 'input_ids', dimension 1: got 70, .*"
                                                r"at most 64.*dynamic_shapes"):
        _run(ext, entry, (2, 70))


def test_specialised_dims_are_reported_with_their_reason():
    model, args, kwargs = ZOO["vit"].build()
    traced = morphc.trace(model, args, kwargs=kwargs)
    fixed = {(s.input, s.dim): s.reason for s in traced.specialised}
    assert "modeling_vit.py" in fixed[("pixel_values", 2)]
    assert ("pixel_values", 0) not in fixed
    report = morphc.inspect(model, args, kwargs=kwargs)
    assert any("pixel_values.size(2) fixed to 32" in s for s in report.specialised)
    assert "specialised: pixel_values.size(2)" in str(report)


def test_a_model_that_fails_on_its_inputs_says_so_before_tracing():
    model, args, kwargs = ZOO["bert"].build()
    bad = {**kwargs, "input_ids": kwargs["input_ids"].float()}
    with pytest.raises(morphc.TraceError, match="the model fails on the example inputs"):
        morphc.extend(model, args, kwargs=bad)


def test_tracing_is_cached_per_model_and_input_signature():
    model, args, kwargs = ZOO["gpt2"].build()
    first = morphc.extend(model, args, kwargs=kwargs, sites="all")
    started = time.perf_counter()
    again = morphc.extend(model, args, kwargs=kwargs, sites="all", width=2)
    assert again.traced is first.traced and again.traced.cached
    assert time.perf_counter() - started < first.traced.trace_seconds
    other = ZOO["gpt2"].inputs(3, 5)
    assert morphc.trace(model, other[0], kwargs=other[1]) is not first.traced
