"""Property tests: E1 and C1 over random shapes, sites, widths, families and dtypes."""

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import morphc
from tests.helpers import max_rel

FAMILIES = ["tanh", "poly", "prelu", "swish"]
TOL = {torch.float32: 1e-6, torch.float64: 1e-12}
SETTINGS = settings(max_examples=60, deadline=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow])


def _perturb(ext, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ext.extension_parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))


def _site_module(ext, name):
    nodes = {n.name: n for n in ext.graph_module.graph.nodes}
    return ext.graph_module.get_submodule(nodes[ext.site_table[name].uses[0].node].target)


def _capture_sites(ext):
    """Per extended site: its input x and the extended output z + B·ρ(Ax + a), from one run."""
    seen, hooks = {}, []
    for name, branch in ext.branches.items():
        site = _site_module(ext, name)
        hooks.append(site.register_forward_hook(
            lambda m, args, out, n=name: seen.setdefault(n, {}).update(x=args[0], z=out)))
        hooks.append(branch.register_forward_hook(
            lambda m, args, out, n=name: seen.setdefault(n, {}).update(branch=out)))
    with torch.no_grad():
        ext(*ext.traced.example_inputs)
    for h in hooks:
        h.remove()
    return seen


def _abs_forward(module, x):
    """The same operator on |x| and |W|: the magnitude of the terms a float dot product sums."""
    with torch.no_grad():
        if isinstance(module, nn.Linear):
            return torch.nn.functional.linear(x.abs(), module.weight.abs())
        return module._conv_forward(x.abs(), module.weight.abs(), None)


def _check(model, inputs, sites, width, family, dtype, seed):
    """E1 bit-for-bit; C1 per site: the folded operator matches ``z + B·ρ(Ax + a)`` on C up to
    float rounding, i.e. within TOL of the magnitude of the summed terms (|W'||x| and |z|, |B·ρ|).
    Comparing at the model output instead would divide rounding by whatever cancellation the
    downstream layers happen to do."""
    model = model.to(dtype)
    inputs = tuple(x.to(dtype) for x in inputs)
    with torch.no_grad():
        original = model(*inputs)
    ext = morphc.extend(model, inputs, sites=sites, width=width, activation=family, seed=seed)
    with torch.no_grad():
        assert torch.equal(ext(*inputs), original)                   # E1
    _perturb(ext, seed)
    ext.set_homotopy(0.0)
    with torch.no_grad():
        assert max_rel(original, ext(*inputs)) > 0                  # the branches are live
    captured = _capture_sites(ext)
    modules = {n: _site_module(ext, n) for n in captured}
    morphc.contract(ext)
    for name, io in captured.items():
        with torch.no_grad():
            folded = modules[name](io["x"])
        expected = io["z"] + io["branch"]
        scale = max(float(_abs_forward(modules[name], io["x"]).max()),
                    float(io["z"].abs().max()), float(io["branch"].abs().max()), 1e-30)
        assert float((folded - expected).abs().max()) <= TOL[dtype] * scale, name   # C1


@SETTINGS
@given(dims=st.lists(st.integers(1, 12), min_size=2, max_size=5),
       batch=st.integers(1, 6), width=st.one_of(st.integers(1, 6), st.sampled_from([0.5, 1.0])),
       family=st.sampled_from(FAMILIES), dtype=st.sampled_from([torch.float32, torch.float64]),
       bias=st.booleans(), data=st.data(), seed=st.integers(0, 2**16))
def test_mlp_property(dims, batch, width, family, dtype, bias, data, seed):
    torch.manual_seed(seed)
    layers = []
    for i in range(len(dims) - 1):
        layers += [nn.Linear(dims[i], dims[i + 1], bias=bias), nn.Tanh()]
    model = nn.Sequential(*layers)
    names = [str(2 * i) for i in range(len(dims) - 1)]
    sites = data.draw(st.lists(st.sampled_from(names), min_size=1, unique=True))
    _check(model, (torch.randn(batch, dims[0]),), sites, width, family, dtype, seed)


@SETTINGS
@given(dim=st.sampled_from([1, 2, 3]), groups=st.sampled_from([1, 2]),
       cin_per_group=st.integers(1, 3), cout_per_group=st.integers(1, 3),
       kernel=st.integers(1, 3), stride=st.integers(1, 2), padding=st.integers(0, 1),
       dilation=st.integers(1, 2), bias=st.booleans(),
       padding_mode=st.sampled_from(["zeros", "reflect", "circular"]),
       width=st.integers(1, 4), family=st.sampled_from(FAMILIES),
       dtype=st.sampled_from([torch.float32, torch.float64]), seed=st.integers(0, 2**16))
def test_conv_property(dim, groups, cin_per_group, cout_per_group, kernel, stride, padding,
                       dilation, bias, padding_mode, width, family, dtype, seed):
    torch.manual_seed(seed)
    conv_cls = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dim]
    cin, cout = groups * cin_per_group, groups * cout_per_group
    conv = conv_cls(cin, cout, kernel, stride=stride, padding=padding, dilation=dilation,
                    groups=groups, bias=bias, padding_mode=padding_mode)
    size = dilation * (kernel - 1) + 3
    _check(nn.Sequential(conv, nn.Tanh()), (torch.randn(2, cin, *([size] * dim)),), "all",
           width, family, dtype, seed)
