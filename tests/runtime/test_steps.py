"""One checked step's helpers: the gradient norm is get_total_norm's, bit for bit; the finiteness
check leaves the gradients as they are."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from morphc.runtime.steps import NonFinite, check_finite, grad_norm


def _params(shapes, dtype, seed, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    params = [nn.Parameter(torch.zeros(s, dtype=dtype)) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen, dtype=dtype) * scale
    return params


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("seed", range(5))
def test_grad_norm_is_get_total_norm_bit_for_bit(dtype, seed):
    shapes = [(2, 2), (2,), (1, 2), (1,), (7, 3, 2)][: seed + 1]
    params = _params(shapes, dtype, seed, scale=10.0 ** (seed - 2))
    want = float(nn.utils.get_total_norm([p.grad for p in params]))
    assert grad_norm(params) == want


def test_grad_norm_mixed_dtypes_and_missing_grads():
    params = _params([(3,), (2, 2)], torch.float32, 0) + _params([(4,)], torch.float64, 1)
    params.append(nn.Parameter(torch.zeros(2)))            # no gradient
    want = float(nn.utils.get_total_norm([p.grad for p in params if p.grad is not None]))
    assert grad_norm(params) == want
    assert grad_norm([nn.Parameter(torch.zeros(1))]) == 0.0


@pytest.mark.parametrize("bad", [math.nan, math.inf, 3e38], ids=["nan", "inf", "overflow"])
def test_grad_norm_non_finite_raises(bad):
    params = _params([(3,)], torch.float32, 0)
    params[0].grad[1] = bad        # 3e38 is finite, but the float32 norm overflows: inf
    with pytest.raises(NonFinite):
        grad_norm(params)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_check_finite_leaves_every_gradient_bit_for_bit(dtype):
    params = _params([(3, 2), (5,), (1,)], dtype, 3, scale=1e3)
    params[1].grad[0] = -0.0
    params[2].grad = None                                  # a parameter without gradient
    before = [p.grad.clone() for p in params[:2]]
    check_finite(params)
    for p, want in zip(params[:2], before, strict=True):
        assert torch.equal(p.grad.view(torch.uint8), want.view(torch.uint8))
    check_finite([nn.Parameter(torch.zeros(1))])           # no gradient at all: nothing to do


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse-falls-back"])
def test_check_finite_raises_on_nan_and_inf(bad, sparse):
    params = _params([(4,), (2, 2)], torch.float32, 0)
    params[1].grad[1, 0] = bad
    if sparse:
        params[1].grad = params[1].grad.to_sparse()
    with pytest.raises(NonFinite, match="gradient"):
        check_finite(params)


def test_check_finite_accepts_large_finite_gradients():
    """Unlike a float32 norm, which overflows to inf, the check looks at the values."""
    params = _params([(3,)], torch.float32, 0)
    params[0].grad[1] = 3e38
    check_finite(params)
    with pytest.raises(NonFinite):
        grad_norm(params)


@settings(max_examples=60, deadline=None)
@given(shapes=st.lists(st.lists(st.integers(1, 4), min_size=0, max_size=3), min_size=1,
                       max_size=4),
       bad=st.one_of(st.none(), st.sampled_from([math.nan, math.inf, -math.inf])),
       where=st.integers(0, 10_000), dtype=st.sampled_from([torch.float32, torch.float64]))
def test_check_finite_raises_exactly_when_some_gradient_is_not_finite(shapes, bad, where, dtype):
    """Any shapes (0-d too), any position of one NaN/Inf: raised iff it is there; otherwise
    every gradient keeps its bits."""
    params = _params([tuple(s) for s in shapes], dtype, where)
    if bad is not None:
        grad = params[where % len(params)].grad
        grad.view(-1)[where % grad.numel()] = bad
    before = [p.grad.clone() for p in params]
    if bad is None:
        check_finite(params)
        assert all(torch.equal(p.grad, b) for p, b in zip(params, before, strict=True))
    else:
        with pytest.raises(NonFinite):
            check_finite(params)
