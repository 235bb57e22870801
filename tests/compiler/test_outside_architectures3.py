"""Torch-module architectures an outside user brings (eighth round): the full nn.Transformer
with masks (batch first or not, norm first), nn.MultiheadAttention with kdim/vdim, bias_kv and
attention weights, scaled_dot_product_attention (causal, boolean mask), RMSNorm / GroupNorm /
LocalResponseNorm / InstanceNorm with running stats, PixelShuffle, ChannelShuffle, dilated
depthwise and grouped transposed convs, MaxUnpool with indices, Upsample modes, parametrize
(orthogonal, custom), complex FFT features, integer branches, torch.where masks, scans, a
forward with ``**kwargs``, ModuleDict heads picked by a string input. Each: E1 bit for bit, a
few training steps, contract into the user's own Parameters (C1), and a weight handed to its
operator through shape-only views (HF Mamba's ``conv1d.weight.squeeze(1).unsqueeze(1)``).
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import morphc
from tests.helpers import _floating_leaves, max_rel, train_extension
from tests.ir.test_sites import linear_operator_weights

_PAD = torch.zeros(2, 5, dtype=torch.bool)
_PAD[0, -1] = True


class _Transformer(nn.Module):
    def __init__(self, batch_first, norm_first):
        super().__init__()
        self.batch_first = batch_first
        self.t = nn.Transformer(16, 2, 1, 1, 32, dropout=0.0, batch_first=batch_first,
                                norm_first=norm_first)

    def forward(self, src, tgt, pad):
        causal = nn.Transformer.generate_square_subsequent_mask(tgt.shape[1 - self.batch_first])
        return self.t(src, tgt, tgt_mask=causal, src_key_padding_mask=pad,
                      memory_key_padding_mask=pad, tgt_is_causal=True)


def _seq(b, t, d=16, first=True):
    x = torch.randn(b, t, d)
    return x if first else x.transpose(0, 1).contiguous()


class _CrossAttention(nn.Module):
    def __init__(self, **options):
        super().__init__()
        self.m = nn.MultiheadAttention(16, 2, batch_first=True, **options)

    def forward(self, q, k, v, pad):
        return self.m(q, k, v, key_padding_mask=pad, need_weights=False)[0]


class _SelfAttentionWeights(nn.Module):
    def __init__(self):
        super().__init__()
        self.m = nn.MultiheadAttention(16, 2)

    def forward(self, x, mask):
        return self.m(x, x, x, attn_mask=mask, need_weights=True, average_attn_weights=False)


class _Sdpa(nn.Module):
    def __init__(self, causal):
        super().__init__()
        self.qkv, self.o, self.causal = nn.Linear(16, 48), nn.Linear(16, 16), causal

    def forward(self, x, mask=None):
        b, t, _ = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, 2, 8).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=self.causal)
        return self.o(y.transpose(1, 2).reshape(b, t, 16))


class _Unpool(nn.Module):
    def __init__(self):
        super().__init__()
        self.c, self.d = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 3, 3, padding=1)
        self.pool, self.unpool = nn.MaxPool2d(2, return_indices=True), nn.MaxUnpool2d(2)
        self.adaptive = nn.AdaptiveMaxPool2d(3, return_indices=True)

    def forward(self, x):
        h, i = self.pool(torch.relu(self.c(x)))
        return self.d(self.unpool(h, i)), *self.adaptive(h)


class _Symmetric(nn.Module):
    def forward(self, w):
        return w.triu() + w.triu(1).transpose(-1, -2)


def _parametrized(kind):
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))
    if kind == "orthogonal":
        nn.utils.parametrizations.orthogonal(model[0])
    else:
        nn.utils.parametrize.register_parametrization(model[0], "weight", _Symmetric())
    return model


class _Spectral(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(16, 16), nn.Linear(18, 4)

    def forward(self, x):
        f = torch.fft.rfft(self.a(x), dim=-1)
        return self.b(torch.view_as_real(f * torch.exp(1j * torch.angle(f))).flatten(-2))


class _Integers(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.e = nn.Linear(4, 4), nn.Embedding(10, 4)

    def forward(self, x, ids):
        return self.a(x) + self.e((ids * 3 + 1) % 10).sum(1) + \
            self.e(torch.cumsum(ids, -1) % 10).mean(1)


class _WhereScan(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.g = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x, keep):
        g = torch.sigmoid(self.g(x))
        h = torch.where(keep.unsqueeze(-1), torch.cumprod(g, 1) * x, torch.zeros_like(x))
        return self.a(h.masked_fill(~keep.unsqueeze(-1), -1.0)) + torch.cumsum(g, 1).cummax(1)[0]


class _Kwargs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x, **kwargs):
        h = self.a(x)
        if "scale" in kwargs:
            h = h * kwargs["scale"]
        return self.b(h)


class _Heads(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = nn.Linear(4, 4)
        self.heads = nn.ModuleDict({"cls": nn.Linear(4, 3), "reg": nn.Linear(4, 1)})

    def forward(self, x, task: str):
        return self.heads[task](torch.tanh(self.enc(x)))


def _inorm():
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.InstanceNorm2d(8, affine=True,
                                                               track_running_stats=True),
                         nn.ReLU(), nn.Conv2d(8, 4, 1))


class _ViewedWeights(nn.Module):
    """Weights handed over through views that return to their own shape, as HF Mamba does."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(4, 6)
        self.conv = nn.Conv1d(6, 6, 3, groups=6, padding=2)
        self.w = nn.Parameter(torch.randn(5, 6) * 0.3)

    def forward(self, x):
        h = self.inp(x).transpose(1, 2)
        weight = self.conv.weight.squeeze(1).unsqueeze(1)
        h = F.conv1d(h, weight, self.conv.bias, padding=2, groups=6)[..., :h.shape[-1]]
        return F.linear(torch.tanh(h.transpose(1, 2)), self.w.reshape(5, 6))


_BOOL = torch.rand(2, 1, 6, 6, generator=torch.Generator().manual_seed(3)) > 0.3
_BOOL[..., 0] = True
_CAUSAL5 = torch.triu(torch.ones(5, 5, dtype=torch.bool), 1)

CASES = {   # name: (model, example args, kwargs, args at another shape or None)
    "transformer_batch_first_norm_first": (lambda: _Transformer(True, True),
                                           (_seq(2, 5), _seq(2, 4), _PAD), None, None),
    "transformer_sequence_first": (lambda: _Transformer(False, False),
                                   (_seq(2, 5, first=False), _seq(2, 4, first=False), _PAD),
                                   None, (_seq(3, 7, first=False), _seq(3, 6, first=False),
                                          torch.zeros(3, 7, dtype=torch.bool))),
    "mha_kdim_vdim_padding": (lambda: _CrossAttention(kdim=12, vdim=10),
                              (_seq(2, 4), _seq(2, 5, 12), _seq(2, 5, 10), _PAD), None, None),
    "mha_bias_kv_zero_attn": (lambda: _CrossAttention(add_bias_kv=True, add_zero_attn=True),
                              (_seq(2, 4), _seq(2, 5), _seq(2, 5), _PAD), None, None),
    "mha_attention_weights": (_SelfAttentionWeights, (_seq(5, 2), _CAUSAL5), None,
                              (_seq(7, 3), torch.triu(torch.ones(7, 7, dtype=torch.bool), 1))),
    "sdpa_is_causal": (lambda: _Sdpa(True), (_seq(2, 6),), None, (_seq(3, 7),)),
    "sdpa_boolean_mask": (lambda: _Sdpa(False), (_seq(2, 6), _BOOL), None, None),
    "rmsnorm": (lambda: nn.Sequential(nn.Linear(8, 16), nn.RMSNorm(16), nn.GELU(),
                                      nn.Linear(16, 4)), (torch.randn(3, 8),), None, None),
    "groupnorm_local_response": (lambda: nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.GroupNorm(2, 8), nn.LocalResponseNorm(3), nn.ReLU(),
        nn.Conv2d(8, 4, 1)), (torch.randn(2, 3, 8, 8),), None, None),
    "instancenorm_running_stats_eval": (lambda: _inorm().eval(), (torch.randn(2, 3, 8, 8),),
                                        None, None),
    "instancenorm_running_stats_train": (lambda: _inorm().train(), (torch.randn(2, 3, 8, 8),),
                                         None, None),
    "pixel_shuffle_unshuffle": (lambda: nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.PixelShuffle(2), nn.Conv2d(4, 4, 3, padding=1),
        nn.PixelUnshuffle(2), nn.Conv2d(16, 3, 1)), (torch.randn(2, 3, 6, 6),), None, None),
    "channel_shuffle_dilated_groups": (lambda: nn.Sequential(
        nn.Conv2d(4, 8, 3, groups=2, padding=1), nn.ChannelShuffle(2),
        nn.Conv2d(8, 8, 3, groups=4, padding=2, dilation=2)), (torch.randn(2, 4, 7, 7),),
        None, None),
    "depthwise_pointwise_strided": (lambda: nn.Sequential(
        nn.Conv2d(6, 6, 3, groups=6, dilation=2, padding=2), nn.ReLU(), nn.Conv2d(6, 12, 1),
        nn.Conv2d(12, 12, (3, 1), groups=12, stride=(2, 1), dilation=(3, 1))),
        (torch.randn(2, 6, 11, 9),), None, None),
    "conv_transpose_groups": (lambda: nn.Sequential(
        nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2, padding=1, output_padding=1), nn.ReLU(),
        nn.ConvTranspose2d(6, 6, 2, stride=2, groups=3, bias=False)),
        (torch.randn(2, 4, 5, 5),), None, None),
    "maxunpool_indices": (_Unpool, (torch.randn(2, 3, 8, 8),), None, None),
    "adaptive_pool_upsample_modes": (lambda: nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.AdaptiveAvgPool2d((3, 5)),
        nn.Upsample(scale_factor=2, mode="bilinear"), nn.Conv2d(8, 4, 1),
        nn.Upsample(size=(9, 9)), nn.Upsample(scale_factor=1.5, mode="bicubic")),
        (torch.randn(2, 3, 9, 9),), None, None),
    "parametrize_orthogonal": (lambda: _parametrized("orthogonal"), (torch.randn(4, 8),),
                               None, None),
    "parametrize_custom": (lambda: _parametrized("symmetric"), (torch.randn(4, 8),), None, None),
    "complex_fft_features": (_Spectral, (torch.randn(3, 16),), None, None),
    "integer_index_branch": (_Integers, (torch.randn(2, 4), torch.randint(0, 10, (2, 5))),
                             None, None),
    "where_mask_and_scans": (_WhereScan, (torch.randn(2, 6, 4), torch.rand(2, 6) > 0.5),
                             None, None),
    "forward_with_var_kwargs": (_Kwargs, (torch.randn(3, 4),), {"scale": torch.rand(3, 1)},
                                None),
    "weights_through_views": (_ViewedWeights, (torch.randn(2, 7, 4),), None,
                              (torch.randn(3, 9, 4),)),
    "moduledict_by_string_input": (_Heads, (torch.randn(3, 4), "reg"), None,
                                   (torch.randn(3, 4), "cls")),
}


def _run(module, args, kwargs=None):
    with torch.no_grad():
        return _floating_leaves(module(*args, **(kwargs or {})))


class _Call(nn.Module):
    """``train_extension`` calls ``ext(*args)``; these keyword inputs ride along."""

    def __init__(self, ext, kwargs):
        super().__init__()
        self.ext, self.kwargs = ext, kwargs

    def forward(self, *args):
        return self.ext(*args, **self.kwargs)


@pytest.mark.parametrize("name", CASES)
def test_outside_architecture_extends_exactly_and_folds_into_its_own_parameters(name):
    make, args, kwargs, other = CASES[name]
    torch.manual_seed(0)
    model = make()
    params = dict(model.named_parameters())
    before = _run(model, args, kwargs)
    ext = morphc.extend(model, args, kwargs=kwargs, sites="all", width=3)
    missing = linear_operator_weights(model) - ext.site_table.covered()
    if name == "moduledict_by_string_input":       # the head task="reg" never calls: its
        missing -= {"heads.cls.weight"}            # graph, traced again for "cls", has no branch
    assert not missing, f"linear weights neither sites nor listed exclusions: {missing}"
    assert all(torch.equal(a, b) for a, b in zip(before, _run(ext, args, kwargs), strict=True))
    if other is not None:
        assert all(torch.equal(a, b) for a, b in zip(_run(model, other), _run(ext, other),
                                                     strict=True))
    train_extension(_Call(ext, kwargs or {}), args)
    ext.set_homotopy(0.0)
    extended = _run(ext, args, kwargs)
    assert max(max_rel(a, b) for a, b in zip(before, extended, strict=True)) > 1e-3
    assert morphc.contract(ext) is model
    assert all(p is params[n] for n, p in model.named_parameters())
    folded = _run(model, args, kwargs)
    assert max(max_rel(a, b) for a, b in zip(extended, folded, strict=True)) < 1e-6


@pytest.mark.parametrize("frontend", ["symbolic_trace", "export"])
def test_a_weight_viewed_back_into_its_own_shape_is_a_site_that_folds(frontend):
    """Was: 'the weight of conv1d is computed from it by other code (squeeze, unsqueeze)', an
    exclusion, so Mamba's convolutions got no branch."""
    torch.manual_seed(0)
    model, x = _ViewedWeights(), torch.randn(2, 7, 4)
    ext = morphc.extend(model, (x,), sites="all", width=3, frontend=frontend)
    assert set(ext.site_table) == {"inp", "conv", "w"} and not ext.site_table.exclusions
    with torch.no_grad():
        assert torch.equal(ext(x), model(x))
        other = torch.randn(3, 9, 4)
        assert torch.equal(ext(other), model(other))
    train_extension(ext, (x,))
    ext.set_homotopy(0.0)
    with torch.no_grad():
        extended = ext(x)
    assert morphc.contract(ext) is model
    with torch.no_grad():
        assert max_rel(extended, model(x)) < 1e-6


class _ViewAlsoReadElsewhere(nn.Module):
    def __init__(self):
        super().__init__()
        self.w, self.other = nn.Parameter(torch.randn(4, 4)), nn.Linear(4, 4)

    def forward(self, x):
        v = self.w.view(4, 4)
        return self.other(F.linear(x, v) + v.sum())


class _ViewIntoAnotherShape(nn.Module):
    def __init__(self):
        super().__init__()
        self.w, self.other = nn.Parameter(torch.randn(6, 4)), nn.Linear(6, 2)

    def forward(self, x):
        return self.other(F.linear(x, self.w.reshape(4, 6).t()))


@pytest.mark.parametrize("make, why", [(_ViewAlsoReadElsewhere, "also used outside"),
                                       (_ViewIntoAnotherShape, "computed from it")])
def test_a_view_read_elsewhere_or_into_another_shape_stays_an_explained_exclusion(make, why):
    torch.manual_seed(0)
    model = make()
    table = morphc.extend(model, (torch.randn(3, 4),), sites="all").site_table
    reason = table.exclusions.get("w") or table["w"].excluded
    assert why in reason and {s.name for s in table.extendable()} == {"other"}


@pytest.mark.parametrize("name", ["transformer_batch_first_norm_first", "sdpa_boolean_mask",
                                  "conv_transpose_groups", "weights_through_views"])
def test_a_forced_bypass_cycle_trains_and_returns_the_users_own_model(name):
    make, args, _, _ = CASES[name]
    torch.manual_seed(0)
    model = make()
    params = dict(model.named_parameters())
    with torch.no_grad():
        target = [torch.randn_like(t) for t in _floating_leaves(model(*args))]

    def loss(m):
        return sum(F.mse_loss(a, b) for a, b in zip(_floating_leaves(m(*args)), target,
                                                    strict=True))

    bp = morphc.Bypass(model, lambda p: torch.optim.Adam(p, lr=1e-2),
                       trigger=morphc.Schedule(at=[1]), bypass_steps=2, return_steps=2,
                       sites="all", width=2, verbose=False, accept="always")
    for _ in range(7):
        bp.step(loss)
    assert any(e["event"] == "contract" for e in bp.history)
    assert bp.finish() is model
    assert all(p is params[n] for n, p in model.named_parameters())


def _half_mlp_trained(eps):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4)).half()
    x, y = torch.randn(3, 8).half(), torch.randn(3, 4).half()
    ext = morphc.extend(model, (x,), sites="all", width=3)
    opt = torch.optim.Adam(ext.parameters(), lr=1e-2, eps=eps)
    for _ in range(3):
        opt.zero_grad()
        F.mse_loss(ext(x), y).backward()
        opt.step()
    ext.set_homotopy(0.0)
    return model, ext, x


def test_a_float16_run_that_diverged_is_named_as_such_not_as_off_the_constraint_set():
    """Was: 'the branches are off the constraint set (residual nan) … ext.set_homotopy(0.0)',
    which the user had just called: Adam's eps=1e-8 is 0 in float16 and A, α have zero gradient
    at B = 0, so their first step is 0/0."""
    _, ext, _ = _half_mlp_trained(1e-8)
    with pytest.raises(morphc.ContractionError, match=r"not finite.*branch 0\.A.*eps=1e-8"):
        morphc.contract(ext)
    model, ext, x = _half_mlp_trained(1e-4)
    params = dict(model.named_parameters())
    with torch.no_grad():
        extended = ext(x)
    assert morphc.contract(ext) is model
    assert all(p is params[n] and p.dtype == torch.float16 for n, p in model.named_parameters())
    with torch.no_grad():
        assert max_rel(extended, model(x)) < 5e-3


class _OwnLoss(nn.Module):
    """A head that checks its labels with Python control flow, as HF's CTC and DeBERTa do."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(4, 3)

    def forward(self, x, labels=None):
        logits = self.head(x)
        if labels is not None:
            if bool(labels.max() >= 3):
                raise ValueError("label out of range")
            return F.cross_entropy(logits, labels), logits
        return logits


def test_a_data_dependent_refusal_names_the_models_line_and_its_loss_inputs():
    """Was: torch.export's guard message and 'Caused by' a line of torch itself; the line to
    change, and that it is the loss the labels asked for, were left to the user to find."""
    model, x = _OwnLoss(), torch.randn(3, 4)
    with pytest.raises(morphc.TraceError, match=r"(?s)test_outside_architectures3\.py:\d+ in "
                       r"forward: if bool\(labels\.max\(\) >= 3\).*own loss \(labels=\)"):
        morphc.extend(model, (x,), kwargs={"labels": torch.tensor([0, 1, 2])}, sites="all")
    ext = morphc.extend(model, (x,), sites="all")          # what the message advises
    with torch.no_grad():
        assert torch.equal(ext(x), model(x))


@pytest.mark.parametrize("hook, names", [(nn.utils.spectral_norm, {"0.weight_orig"}),
                                         (nn.utils.weight_norm, {"0.weight_g", "0.weight_v"})])
def test_a_weight_computed_by_a_pre_hook_is_an_explained_exclusion(hook, names):
    """Was: neither a site nor an exclusion (the old hooks make ``weight`` a plain attribute);
    naming the layer gave no reason."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    hook(model[0])
    model.eval()                   # spectral_norm's power iteration moves u in train mode
    x = torch.randn(3, 8)
    ext = morphc.extend(model, (x,), sites="all", width=3)
    assert set(ext.site_table.exclusions) == names
    assert all("pre-hook" in ext.site_table.exclusions[n] for n in names)
    with torch.no_grad():
        assert torch.equal(ext(x), model(x))
    with pytest.raises(morphc.SiteError, match="no Parameter: a forward pre-hook"):
        morphc.extend(model, (x,), sites=["0"])
