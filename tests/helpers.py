"""Shared test helpers: train an extension a little, then check the fold."""

import pytest
import torch
from torch import nn

import morphc
import morphc.compiler.deviation


def train_extension(ext, inputs, steps=5, lr=1e-2, seed=0, kwargs=None):
    """A few Adam steps on a random regression target, so every branch moves off B = 0.
    Outputs may be any pytree (dict, namedtuple, tuple with None): every floating leaf counts.
    ``kwargs``: keyword inputs (HF models), passed with ``inputs`` at every call."""
    gen = torch.Generator().manual_seed(seed)
    kwargs = kwargs or {}
    with torch.no_grad():
        outs = _floating_leaves(ext(*inputs, **kwargs))
    targets = [torch.randn(out.shape, generator=gen, dtype=out.dtype) for out in outs]
    opt = torch.optim.Adam(ext.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        loss = sum(torch.nn.functional.mse_loss(out, target)
                   for out, target in zip(_floating_leaves(ext(*inputs, **kwargs)), targets,
                                          strict=True))
        loss.backward()
        opt.step()
    return ext


def fold_trained(model, args, ext):
    """Train ``ext`` off B = 0, contract at s = 0 into ``model``'s own Parameters; returns
    (extended output, folded output)."""
    params = dict(model.named_parameters())
    train_extension(ext, args)
    ext.set_homotopy(0.0)
    with torch.no_grad():
        extended = ext(*args)
    assert morphc.contract(ext) is model
    assert all(p is params[n] for n, p in model.named_parameters())
    with torch.no_grad():
        return extended, model(*args)


def regression_task(seed=0, steps=20):
    """A 6-12-3 tanh MLP and ``steps`` random regression minibatches, both from ``seed``."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3))
    gen = torch.Generator().manual_seed(seed + 1)
    batches = [(torch.randn(16, 6, generator=gen), torch.randn(16, 3, generator=gen))
               for _ in range(steps)]
    return model, batches


def _floating_leaves(output):
    return [t for t in torch.utils._pytree.tree_leaves(output)
            if isinstance(t, torch.Tensor) and t.is_floating_point()]


def max_rel(a, b):
    return morphc.compiler.deviation.relative_deviation(a, b)


def tiny_gpt2(dropout: float = 0.0):
    """A 2-layer, 16-wide GPT-2 LM with tied embeddings, no dropout unless asked (skips without
    transformers): the integrations' Hugging Face model."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(vocab_size=40, n_positions=16, n_embd=16, n_layer=2, n_head=2,
                                  resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
                                  bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(cfg)


class TokenData(torch.utils.data.Dataset):
    """Random token ids that are their own labels: a language-model batch for the trainers."""

    def __init__(self, n=64, length=12, vocab=40, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, vocab, (n, length), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class SparseBag(nn.Module):
    """A sparse embedding bag with a linear head: gradients Bypass must handle sparse."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(20, 8, sparse=True)
        self.head = nn.Linear(8, 1)

    def forward(self, index):
        return self.head(torch.tanh(self.embed(index))).squeeze(-1)


def train_step(bp, model, optimizer, loss_of):
    """One step of the pair a test compares: through Bypass when there is one (``bp``), else
    plain training of ``model`` (the user's module, or what they call: a compiled one)."""
    if bp is not None:
        return bp.step(loss_of)
    optimizer.zero_grad()
    loss = loss_of(model)
    loss.backward()
    optimizer.step()
    return loss


def training_state(model, optimizer):
    """A model's weights and buffers and its optimizer's per-parameter state, copied: what a
    run without morphc must match bit for bit."""
    params = {k: v.detach().clone() for k, v in model.state_dict().items()}
    opt = {n: {k: (v.clone() if torch.is_tensor(v) else v) for k, v in optimizer.state[p].items()}
           for n, p in model.named_parameters() if p in optimizer.state}
    return params, opt


def state_differences(a, b) -> list[str]:
    """Names whose values differ between two :func:`training_state` (empty: bit-identical)."""
    (pa, oa), (pb, ob) = a, b
    assert pa.keys() == pb.keys() and oa.keys() == ob.keys()
    bad = [k for k in pa if not torch.equal(pa[k], pb[k])]
    bad += [f"{n}.{k}" for n in oa for k in oa[n]
            if not (torch.equal(oa[n][k], ob[n][k]) if torch.is_tensor(oa[n][k])
                    else oa[n][k] == ob[n][k])]
    return bad

