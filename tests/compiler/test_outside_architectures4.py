"""Torch-module architectures an outside user writes by hand (ninth round): a ResNet with a
downsample shortcut and zero-initialised last BatchNorm gamma, DenseNet concatenation, Inception
branches, a U-Net with skip concatenation and F.interpolate, squeeze-excitation (SiLU, sigmoid and
hardsigmoid gates, adaptive pooling), a MobileNetV3 block, GNN message passing (index_add_,
scatter_reduce over an edge index), NeRF positional encoding, a VAE sampling in its forward, a
Perceiver's learned latent array, a weight shared by two calls, torch.func.functional_call, a
nn.Bilinear + per-channel PReLU + GLU, an embedding with max_norm, TransformerDecoder with memory,
rotary attention, a Conformer block, LSTM over packed sequences, a 2-layer bidirectional GRU and
projections that take row slices of one parameter. Each: E1 bit for bit (at the example and at
another batch size), a few training steps, contract into the user's own Parameters (C1), and every
linear weight a site or a listed exclusion; and what morphc cannot extend, said so.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import morphc
from tests.helpers import _floating_leaves, max_rel, train_extension
from tests.ir.test_sites import linear_operator_weights


# -- convolutional ------------------------------------------------------------------------------
class _Block(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.c1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.b1, self.b2 = nn.BatchNorm2d(cout), nn.BatchNorm2d(cout)
        self.c2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        nn.init.zeros_(self.b2.weight)                 # the "zero-init last gamma" trick
        self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                  nn.BatchNorm2d(cout)) if stride != 1 or cin != cout else None

    def forward(self, x):
        shortcut = x if self.down is None else self.down(x)
        return F.relu(self.b2(self.c2(F.relu(self.b1(self.c1(x))))) + shortcut)


class _ResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8),
                                  nn.ReLU(inplace=True))
        self.layers = nn.Sequential(_Block(8, 8, 1), _Block(8, 16, 2))
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.layers(self.stem(x)), 1), 1))


class _DenseNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.layers = nn.ModuleList(nn.Sequential(nn.BatchNorm2d(6 + 4 * i), nn.ReLU(),
                                                  nn.Conv2d(6 + 4 * i, 4, 3, padding=1,
                                                            bias=False)) for i in range(3))
        self.transition = nn.Sequential(nn.BatchNorm2d(18), nn.ReLU(), nn.Conv2d(18, 8, 1),
                                        nn.AvgPool2d(2))
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        features = [self.stem(x)]
        for layer in self.layers:
            features.append(layer(torch.cat(features, 1)))
        return self.fc(self.transition(torch.cat(features, 1)).mean((2, 3)))


class _Inception(nn.Module):
    def __init__(self):
        super().__init__()
        self.b1 = nn.Conv2d(4, 4, 1)
        self.b3 = nn.Sequential(nn.Conv2d(4, 3, 1), nn.ReLU(), nn.Conv2d(3, 4, 3, padding=1))
        self.b5 = nn.Sequential(nn.Conv2d(4, 2, 1), nn.ReLU(), nn.Conv2d(2, 4, 5, padding=2))
        self.pool = nn.Sequential(nn.MaxPool2d(3, 1, 1), nn.Conv2d(4, 4, 1))
        self.out = nn.Conv2d(16, 2, 1)

    def forward(self, x):
        return self.out(F.relu(torch.cat([self.b1(x), self.b3(x), self.b5(x), self.pool(x)], 1)))


class _UNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.d1, self.d2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 16, 3, padding=1)
        self.d3 = nn.Conv2d(16, 16, 3, padding=1)
        self.up = nn.ConvTranspose2d(16, 16, 2, stride=2)
        self.u2, self.u1 = nn.Conv2d(32, 8, 3, padding=1), nn.Conv2d(16, 8, 3, padding=1)
        self.out = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        s1 = F.relu(self.d1(x))
        s2 = F.relu(self.d2(F.max_pool2d(s1, 2)))
        h = F.relu(self.d3(F.max_pool2d(s2, 2)))
        h = F.relu(self.u2(torch.cat([self.up(h), s2], 1)))
        h = F.interpolate(h, size=s1.shape[-2:], mode="bilinear", align_corners=False)
        return self.out(F.relu(self.u1(torch.cat([h, s1], 1))))


class _SqueezeExcite(nn.Module):
    def __init__(self, c, gate=torch.sigmoid, act=nn.SiLU):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1, self.act, self.fc2 = nn.Conv2d(c, c // 4, 1), act(), nn.Conv2d(c // 4, c, 1)
        self.gate = gate

    def forward(self, x):
        return x * self.gate(self.fc2(self.act(self.fc1(self.pool(x)))))


class _SENet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c, self.se, self.fc = nn.Conv2d(3, 8, 3, padding=1), _SqueezeExcite(8), nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(self.se(F.silu(self.c(x))).mean((-1, -2)))


class _MobileNetV3Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.expand = nn.Sequential(nn.Conv2d(4, 12, 1, bias=False), nn.BatchNorm2d(12),
                                    nn.Hardswish())
        self.dw = nn.Sequential(nn.Conv2d(12, 12, 3, 2, 1, groups=12, bias=False),
                                nn.BatchNorm2d(12), nn.Hardswish())
        self.se = _SqueezeExcite(12, gate=F.hardsigmoid, act=nn.ReLU)
        self.project = nn.Sequential(nn.Conv2d(12, 4, 1, bias=False), nn.BatchNorm2d(4))
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h = self.project(self.se(self.dw(self.expand(x)))) + F.avg_pool2d(x, 2)
        return self.head(F.adaptive_avg_pool2d(h, 1).flatten(1))


# -- graphs, fields, generative -----------------------------------------------------------------
class _MessagePassing(nn.Module):
    def __init__(self):
        super().__init__()
        self.msg, self.update, self.out = nn.Linear(6, 8), nn.Linear(14, 8), nn.Linear(8, 2)

    def forward(self, x, edges):
        src, dst = edges
        m = self.msg(x)[src]
        summed = torch.zeros(x.shape[0], 8, dtype=x.dtype).index_add_(0, dst, m)
        biggest = torch.zeros(x.shape[0], 8, dtype=x.dtype).scatter_reduce(
            0, dst.unsqueeze(-1).expand_as(m), m, reduce="amax", include_self=False)
        return self.out(torch.relu(self.update(torch.cat([x, summed], -1))) + biggest)


class _NeRF(nn.Module):
    def __init__(self, bands=4):
        super().__init__()
        self.register_buffer("freqs", 2.0 ** torch.arange(bands) * torch.pi)
        d = 3 + 6 * bands
        self.l1, self.l2, self.l3 = nn.Linear(d, 16), nn.Linear(16, 16), nn.Linear(16 + d, 4)

    def forward(self, p):
        e = (p[..., None] * self.freqs).flatten(-2)
        encoded = torch.cat([p, torch.sin(e), torch.cos(e)], -1)
        return self.l3(torch.cat([F.relu(self.l2(F.relu(self.l1(encoded)))), encoded], -1))


class _VAE(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc, self.mu, self.logvar = nn.Linear(8, 16), nn.Linear(16, 4), nn.Linear(16, 4)
        self.dec = nn.Linear(4, 8)

    def forward(self, x):
        h = torch.tanh(self.enc(x))
        mu, logvar = self.mu(h), self.logvar(h)
        return self.dec(mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)), mu, logvar


class _Perceiver(nn.Module):
    """A learned latent array (an nn.Parameter used as an input) cross-attending to the data."""

    def __init__(self):
        super().__init__()
        self.latents = nn.Parameter(torch.randn(4, 16))
        self.q, self.kv, self.o = nn.Linear(16, 16), nn.Linear(8, 32), nn.Linear(16, 3)

    def forward(self, x):
        q = self.q(self.latents).expand(x.shape[0], -1, -1)
        k, v = self.kv(x).chunk(2, -1)
        return self.o(torch.softmax(q @ k.transpose(1, 2) / 4.0, -1) @ v + self.latents)


# -- weights reached in unusual ways ------------------------------------------------------------
class _SharedTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin, self.out = nn.Linear(8, 8), nn.Linear(8, 2)

    def forward(self, x, y):
        return self.out(torch.tanh(self.lin(x)) * torch.tanh(self.lin(y)))


class _FunctionalCall(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner, self.out = nn.Linear(8, 8), nn.Linear(8, 2)

    def forward(self, x):
        h = torch.func.functional_call(self.inner, dict(self.inner.named_parameters()), (x,))
        return self.out(torch.tanh(h))


class _BilinearPReLUGLU(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.bil = nn.Linear(6, 8), nn.Linear(6, 8), nn.Bilinear(8, 8, 8)
        self.prelu, self.glu_in, self.out = nn.PReLU(8), nn.Linear(8, 8), nn.Linear(4, 2)

    def forward(self, x):
        return self.out(F.glu(self.glu_in(self.prelu(self.bil(self.a(x), self.b(x)))), -1))


class _MaxNormEmbedding(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.out = nn.Embedding(10, 8, max_norm=1.0), nn.Linear(8, 2)
        with torch.no_grad():
            self.emb.weight.mul_(3.0)                 # rows longer than max_norm

    def forward(self, ids):
        return self.out(self.emb(ids).mean(1))


class _RowSlices(nn.Module):
    """Two projections packed in one parameter, each taken by Python slicing."""

    def __init__(self, first=slice(None, 6), second=slice(-6, None)):
        super().__init__()
        self.w, self.b = nn.Parameter(torch.randn(12, 8) * 0.3), nn.Parameter(torch.zeros(12))
        self.first, self.second = first, second
        self.out = nn.Linear(6, 2)

    def forward(self, x):
        a = F.linear(x, self.w[self.first], self.b[_rows(self.first)])
        return self.out(torch.tanh(a) * F.linear(x, self.w[self.second],
                                                 self.b[_rows(self.second)]))


def _rows(index):
    """The row part of an index: ``W[a:b, :]`` takes the bias rows ``b[a:b]``."""
    return index[0] if isinstance(index, tuple) else index


# -- sequence models ----------------------------------------------------------------------------
class _Decoder(nn.Module):
    def __init__(self):
        super().__init__()
        layer = nn.TransformerDecoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.dec = nn.TransformerDecoder(layer, 2)

    def forward(self, tgt, memory):
        mask = nn.Transformer.generate_square_subsequent_mask(tgt.shape[1])
        return self.dec(tgt, memory, tgt_mask=mask, tgt_is_causal=True)


class _Rotary(nn.Module):
    def __init__(self, d=16, heads=2):
        super().__init__()
        self.heads, self.dh = heads, d // heads
        self.qkv, self.o = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.register_buffer("inv", 1.0 / 10000 ** (torch.arange(0, self.dh, 2) / self.dh),
                             persistent=False)

    @staticmethod
    def _rotate(x):
        x1, x2 = x.chunk(2, -1)
        return torch.cat([-x2, x1], -1)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, self.dh).transpose(1, 3).unbind(2)
        angles = torch.outer(torch.arange(t, dtype=self.inv.dtype), self.inv)
        cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
        q, k = q * cos + self._rotate(q) * sin, k * cos + self._rotate(k) * sin
        a = torch.softmax(q @ k.transpose(-1, -2) / self.dh ** 0.5, -1) @ v
        return self.o(a.transpose(1, 2).reshape(b, t, d))


class _Conformer(nn.Module):
    def __init__(self, d=16):
        super().__init__()
        self.ff = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, 32), nn.SiLU(), nn.Linear(32, d))
        self.ln, self.attn = nn.LayerNorm(d), nn.MultiheadAttention(d, 2, batch_first=True)
        self.pw1, self.dw = nn.Conv1d(d, 2 * d, 1), nn.Conv1d(d, d, 5, padding=2, groups=d)
        self.bn, self.pw2 = nn.BatchNorm1d(d), nn.Conv1d(d, d, 1)

    def forward(self, x):
        x = x + 0.5 * self.ff(x)
        h = self.ln(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        c = self.pw2(F.silu(self.bn(self.dw(F.glu(self.pw1(x.transpose(1, 2)), 1)))))
        return x + c.transpose(1, 2)


class _PackedLSTM(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp, self.lstm = nn.Linear(4, 8), nn.LSTM(8, 8, batch_first=True)
        self.last, self.each = nn.Linear(8, 2), nn.Linear(8, 3)

    def forward(self, x, lengths):
        packed = nn.utils.rnn.pack_padded_sequence(self.inp(x), lengths, batch_first=True,
                                                   enforce_sorted=False)
        steps, (h, _) = self.lstm(packed)
        padded, _ = nn.utils.rnn.pad_packed_sequence(steps, batch_first=True,
                                                     total_length=x.shape[1])
        return self.last(h[-1]), self.each(padded)


class _BiGRU(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp, self.out = nn.Linear(4, 8), nn.Linear(16, 2)
        self.gru = nn.GRU(8, 8, num_layers=2, bidirectional=True, batch_first=True)

    def forward(self, x):
        return self.out(self.gru(self.inp(x))[0])


def _images(b, c=3, s=8):
    return torch.randn(b, c, s, s)


_EDGES = torch.tensor([[0, 1, 2, 3, 4, 0], [1, 2, 3, 4, 0, 2]])
_EDGES7 = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 6, 1], [1, 2, 3, 4, 5, 6, 0, 2, 3]])

CASES = {   # name: (model, example args, args at another batch size (and length))
    "resnet_downsample_zero_gamma_train": (_ResNet, (_images(2),), (_images(3, s=10),)),
    "resnet_downsample_zero_gamma_eval": (lambda: _ResNet().eval(), (_images(2),),
                                          (_images(3, s=10),)),
    "densenet_concat": (lambda: _DenseNet().eval(), (_images(2),), (_images(3, s=6),)),
    "inception_branches": (_Inception, (_images(2, 4, 7),), (_images(3, 4, 5),)),
    "unet_skip_interpolate": (_UNet, (_images(2),), (_images(3, s=12),)),
    "squeeze_excitation": (_SENet, (_images(2),), (_images(3, s=6),)),
    "mobilenet_v3_block": (lambda: _MobileNetV3Block().eval(), (_images(2, 4),),
                           (_images(3, 4, 10),)),
    "gnn_index_add_scatter_reduce": (_MessagePassing, (torch.randn(5, 6), _EDGES),
                                     (torch.randn(7, 6), _EDGES7)),
    "nerf_positional_encoding": (_NeRF, (torch.randn(2, 3),), (torch.randn(5, 7, 3),)),
    "vae_randn_like": (_VAE, (torch.randn(2, 8),), (torch.randn(5, 8),)),
    "perceiver_latent_parameter": (_Perceiver, (torch.randn(2, 5, 8),), (torch.randn(3, 7, 8),)),
    "weight_shared_by_two_calls": (_SharedTwice, (torch.randn(2, 8), torch.randn(2, 8)),
                                   (torch.randn(5, 8), torch.randn(5, 8))),
    "functional_call": (_FunctionalCall, (torch.randn(2, 8),), (torch.randn(5, 8),)),
    "bilinear_prelu_glu": (_BilinearPReLUGLU, (torch.randn(2, 6),), (torch.randn(5, 6),)),
    "embedding_max_norm": (_MaxNormEmbedding, (torch.randint(0, 10, (2, 4)),),
                           (torch.randint(0, 10, (5, 3)),)),
    "row_slices_by_indexing": (_RowSlices, (torch.randn(2, 8),), (torch.randn(5, 8),)),
    "transformer_decoder_memory": (_Decoder, (torch.randn(2, 4, 16), torch.randn(2, 5, 16)),
                                   (torch.randn(3, 6, 16), torch.randn(3, 7, 16))),
    "rotary_attention": (_Rotary, (torch.randn(2, 5, 16),), (torch.randn(3, 7, 16),)),
    "conformer_block": (_Conformer, (torch.randn(2, 6, 16),), (torch.randn(3, 9, 16),)),
    "lstm_packed_sequences": (_PackedLSTM, (torch.randn(3, 5, 4), torch.tensor([5, 2, 3])),
                              (torch.randn(2, 4, 4), torch.tensor([1, 4]))),
    "bidirectional_gru_two_layers": (_BiGRU, (torch.randn(2, 5, 4),), (torch.randn(3, 7, 4),)),
}


def _run(module, args):
    torch.manual_seed(5)                # the VAE samples: the same noise in both runs
    with torch.no_grad():
        return _floating_leaves(module(*args))


def _same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


# several tiny convolutions training on a shared 2-core CPU take 5-20 s; one of each kind stays
_SLOW = {"resnet_downsample_zero_gamma_train", "densenet_concat", "inception_branches",
         "unet_skip_interpolate", "mobilenet_v3_block", "transformer_decoder_memory"}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in _SLOW else n
                                  for n in CASES])
def test_hand_built_architecture_extends_exactly_and_folds_into_its_own_parameters(name):
    make, args, other = CASES[name]
    torch.manual_seed(0)
    model = make()
    params = dict(model.named_parameters())
    state = copy.deepcopy(model.state_dict())
    ext = morphc.extend(model, args, sites="all", width=3)
    assert _same(list(state.values()), list(model.state_dict().values()))   # extend: no trace
    missing = linear_operator_weights(model) - ext.site_table.covered()
    assert not missing, f"linear weights neither sites nor listed exclusions: {missing}"
    twin = copy.deepcopy(model)         # what the model computes (max_norm renorms as it runs)
    for inputs in (args, other):                                               # E1
        assert _same(_run(twin, inputs), _run(ext, inputs))
    before = [_run(model, inputs) for inputs in (args, other)]
    train_extension(ext, args)
    ext.set_homotopy(0.0)
    extended = [_run(ext, inputs) for inputs in (args, other)]
    assert max(max_rel(a, b) for a, b in zip(before[0], extended[0], strict=True)) > 1e-3
    assert morphc.contract(ext) is model
    assert all(p is params[n] for n, p in model.named_parameters())
    for inputs, expected in zip((args, other), extended, strict=True):          # C1
        got = _run(model, inputs)
        assert max(max_rel(a, b) for a, b in zip(expected, got, strict=True)) < 1e-6


# -- what failed before -------------------------------------------------------------------------
@pytest.mark.parametrize("frontend", ["symbolic_trace", "export"])
@pytest.mark.parametrize("first, second", [(slice(None, 6), slice(-6, None)),
                                           (slice(-12, -6), slice(6, None)),
                                           ((slice(0, 6), slice(None)), (slice(6, 12), ...))],
                         ids=["head_tail", "negative_stop", "tuple_index"])
def test_a_row_slice_taken_by_python_indexing_is_a_site(first, second, frontend):
    """``F.linear(x, self.w[:6])``: symbolic_trace records ``getitem``, which was not read as a
    row slice, so the weight was an exclusion that said 'pass ... a row slice to make it a site'.
    Under torch.export a negative bound (``w[-6:]``) was taken literally: extend crashed with a
    raw RuntimeError (a branch of 18 outputs for a 6-row slice)."""
    torch.manual_seed(0)
    model, x = _RowSlices(first, second), torch.randn(3, 8)
    params = dict(model.named_parameters())
    ext = morphc.extend(model, (x,), sites="all", width=3, frontend=frontend)
    rows = [_rows(s).indices(12)[:2] for s in (first, second)]
    assert {s.name for s in ext.sites} == {f"w.rows{a}_{b}" for a, b in rows} | {"out"}
    assert not ext.site_table.exclusions
    with torch.no_grad():
        assert torch.equal(ext(x), model(x))
    train_extension(ext, (x,))
    ext.set_homotopy(0.0)
    with torch.no_grad():
        extended = ext(x)
    assert morphc.contract(ext) is model and model.w is params["w"]
    with torch.no_grad():
        assert max_rel(model(x), extended) < 1e-6


class _Overlapping(nn.Module):
    def __init__(self, first, second):
        super().__init__()
        self.w, self.head = nn.Parameter(torch.randn(12, 8) * 0.3), nn.Linear(8, 2)
        self.first, self.second = first, second

    def forward(self, x):
        a = F.linear(x, self.w[self.first])[:, :8]
        return self.head(torch.tanh(a + F.linear(x, self.w[self.second])[:, :8]))


@pytest.mark.parametrize("frontend", ["symbolic_trace", "export"])
@pytest.mark.parametrize("first, second", [(slice(0, 8), slice(4, 12)),
                                           (slice(None), slice(0, 8))],
                         ids=["overlapping", "whole_and_slice"])
def test_row_slices_that_overlap_are_explained_exclusions(first, second, frontend):
    """Two row ranges of one parameter that share rows were two sites, and contract refused
    with 'the fold itself is wrong: a morphc bug' (each branch's update went into the shared
    rows); a whole use next to a slice excluded only the slice, and the whole site's fold
    changed what the slice computed, with the same refusal."""
    torch.manual_seed(0)
    model, x = _Overlapping(first, second), torch.randn(3, 8)
    ext = morphc.extend(model, (x,), sites="all", width=3, frontend=frontend)
    assert [s.name for s in ext.sites] == ["head"]
    reasons = [s.excluded for s in ext.site_table.values() if s.excluded]
    assert len(reasons) == 2 and all("overlapping row ranges" in r for r in reasons)
    assert "overlapping row ranges" in str(morphc.inspect(model, (x,)))
    train_extension(ext, (x,))
    ext.set_homotopy(0.0)
    with torch.no_grad():
        extended = ext(x)
    morphc.contract(ext)
    with torch.no_grad():
        assert max_rel(model(x), extended) < 1e-6


def test_an_lstm_over_packed_sequences_extends_and_leaves_later_traces_working():
    """``pack_padded_sequence`` reads its lengths as values: symbolic_trace failed on
    ``torch.as_tensor(lengths)``, torch.export on the data-dependent sizes, and the TraceError
    blamed 'data-dependent Python control flow' in a forward that has none. The packing
    functions are calls in the graph now (the LSTM a leaf, its weights exclusions); and their
    generated code must not register fx.wrap names that break every later torch.export."""
    make, args, _ = CASES["lstm_packed_sequences"]
    model = make()
    assert morphc.extend(model, args, sites="all").traced.frontend == "symbolic_trace"
    assert "lstm.weight_ih_l0: fused RNN" in str(morphc.inspect(model, args))
    later = morphc.extend(_MLP(), (torch.randn(3, 4),), sites="all", frontend="export")
    assert later.traced.frontend == "export"


class _MLP(nn.Sequential):
    def __init__(self):
        super().__init__(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))


class _Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(
            16, 2, 32, dropout=0.0, batch_first=True), 2)

    def forward(self, x, pad):
        return self.enc(x, src_key_padding_mask=pad)


class _SelfAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)

    def forward(self, x, pad):
        return self.attn(x, x, x, key_padding_mask=pad, need_weights=False)[0]


_X, _PAD = torch.randn(2, 6, 16), torch.zeros(2, 6, dtype=torch.bool)
_PAD[0, -2:] = True


@pytest.mark.parametrize("make, outer", [(_Encoder, "enc"), (_SelfAttention, "attn")])
def test_eval_mode_attention_fast_path_is_named_not_a_silent_e1_break(make, outer):
    """In eval() under torch.no_grad(), nn.TransformerEncoder / MultiheadAttention run PyTorch's
    fused fast path (nested tensors: 0 at padded positions), which no graph records: the
    extended model differed from the model by 0.7 (relative) there, silently. extend now warns,
    inspect notes it, and the fix it names makes the two agree bit for bit; with grad enabled
    (training) they agree anyway."""
    torch.manual_seed(0)
    model = make().eval()
    with pytest.warns(UserWarning, match=rf"{outer} in eval\(\) mode.*fast path.*"
                                         r"set_fastpath_enabled\(False\)"):
        ext = morphc.extend(model, (_X, _PAD), sites="all", width=3)
    assert any("fast path" in n for n in ext.traced.notes)
    assert "fast path" in str(morphc.inspect(model, (_X, _PAD)))
    assert torch.equal(ext(_X, _PAD), model(_X, _PAD))                 # grad enabled: the same
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad():
            assert torch.equal(ext(_X, _PAD), model(_X, _PAD))
    finally:
        torch.backends.mha.set_fastpath_enabled(True)
    with torch.no_grad():
        assert not torch.equal(ext(_X, _PAD), model(_X, _PAD))         # what the warning says


def test_an_embedding_with_max_norm_is_not_renormalised_by_extend():
    """``nn.Embedding(max_norm=...)`` renormalises the rows it looks up, in place, on every
    forward: morphc's probe runs (the example run, tracing, shape propagation) rewrote the
    user's embedding weights during ``extend``/``inspect``, which say they leave the model as
    it was."""
    torch.manual_seed(0)
    model, ids = _MaxNormEmbedding(), torch.randint(0, 10, (2, 4))
    before = model.emb.weight.detach().clone()
    for frontend in ("symbolic_trace", "export"):
        morphc.extend(model, (ids,), sites="all", frontend=frontend)
        morphc.inspect(model, (ids,))
        assert torch.equal(model.emb.weight, before)


class _Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc, self.mid = nn.Linear(8, 4), nn.Linear(4, 4)
        self.dec_bias = nn.Parameter(torch.zeros(8))

    def forward(self, x):
        h = torch.tanh(self.mid(torch.tanh(self.enc(x))))
        return F.linear(h, self.enc.weight.t(), self.dec_bias)


def test_a_decoder_tied_to_the_encoders_transpose_is_an_exclusion_that_says_untie():
    torch.manual_seed(0)
    model, x = _Tied(), torch.randn(3, 8)
    ext = morphc.extend(model, (x,), sites="all", width=3)
    assert [s.name for s in ext.sites] == ["mid"]
    assert "untie them" in ext.site_table["enc"].excluded
    with torch.no_grad():
        assert torch.equal(ext(x), model(x))
    with pytest.raises(morphc.SiteError, match="untie them"):
        morphc.extend(model, (x,), sites=["enc"])
