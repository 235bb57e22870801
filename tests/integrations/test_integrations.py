"""Bypass inside real trainers: morphc.integrations (HF Trainer, Lightning) and its in-place core.

The trainer tests run the real ``transformers.Trainer`` / ``lightning.Trainer`` on tiny models
(configs + random weights, no downloads, CPU, a few dozen steps) and skip cleanly when the extra
is not installed.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import morphc
from morphc.compiler.deviation import relative_deviation
from morphc.errors import SiteError
from morphc.integrations.core import TrainerBypass
from morphc.integrations.extension import InPlaceExtension
from morphc.integrations.sites import module_sites
from morphc.runtime.cycle import Cycle
from tests.helpers import TokenData, tiny_gpt2

os.environ.setdefault("HF_HUB_OFFLINE", "1")


# -- the in-place core, no trainer ---------------------------------------------------------------
class Conv1D(nn.Module):
    """transformers' Conv1D, re-declared: ``addmm(b, x, W)`` with W stored (in, out)."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.2)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x):
        size = x.size()[:-1] + (self.nf,)
        return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(size)


CORE_CASES = {
    "linear": (lambda: nn.Linear(6, 5), (3, 6)),
    "linear_nobias": (lambda: nn.Linear(6, 5, bias=False), (2, 4, 6)),
    "conv2d_groups": (lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2), (2, 4, 9, 9)),
    "conv1d_reflect": (lambda: nn.Conv1d(3, 4, 3, padding=1, padding_mode="reflect"), (2, 3, 8)),
    "conv_transpose2d": (lambda: nn.ConvTranspose2d(4, 2, 3, stride=2, output_padding=1),
                         (2, 4, 5, 5)),
    "hf_conv1d": (lambda: Conv1D(5, 6), (2, 3, 6)),
}


@pytest.mark.parametrize("case", sorted(CORE_CASES))
def test_in_place_fold_is_exact_per_kind(case):
    """Perturbed off B = 0 and off C, then s = 0: the fold into the module's own weight gives
    the extended output (and the output differed from the base: not a vacuous fold)."""
    torch.manual_seed(0)
    build, shape = CORE_CASES[case]
    module = build().double()
    x = torch.randn(*shape, dtype=torch.float64)
    keys, params = list(module.state_dict()), list(module.parameters())
    base = module(x)
    table, modules = module_sites(module)
    ext = InPlaceExtension(module, table.extendable(), modules, width=2, seed=1)
    with torch.no_grad():
        for branch in ext.branches.values():
            branch.B.normal_()
            branch.alpha.add_(0.3)
    ext.set_homotopy(0.0)
    extended = module(x)
    assert relative_deviation(base, extended) > 1e-3
    deviation = ext.fold()
    assert deviation <= 1e-12
    assert relative_deviation(extended, module(x)) <= 1e-12
    assert list(module.state_dict()) == keys and list(module.parameters()) == params
    assert not module._forward_hooks and ext.removed


def test_off_constraint_set_refuses_to_fold():
    module = nn.Linear(3, 2)
    table, modules = module_sites(module)
    ext = InPlaceExtension(module, table.extendable(), modules, width=2)
    with torch.no_grad():
        ext.branches["<root>"].alpha.add_(0.5)
    before = module.weight.detach().clone()
    with pytest.raises(morphc.ContractionError, match="off the constraint set"):
        ext.fold()
    assert torch.equal(module.weight, before)


def test_module_sites_exclude_tied_parametrized_and_mha():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 4)
            self.head = nn.Linear(4, 10, bias=False)
            self.head.weight = self.emb.weight
            self.attn = nn.MultiheadAttention(4, 2)
            self.norm = nn.utils.parametrizations.weight_norm(nn.Linear(4, 4))
            self.fc = nn.Linear(4, 3)
            self.conv = nn.Conv2d(2, 2, 1)

    table, modules = module_sites(Net())
    assert [s.name for s in table.extendable()] == ["fc", "conv"]
    assert "tied" in table["head"].excluded
    assert "MultiheadAttention" in table["attn.out_proj"].excluded
    assert "parametrization" in table.exclusions["norm.weight"]
    assert set(modules) >= {"fc", "conv"}


def test_joint_free_micro_batches_leave_batchnorm_statistics_to_s0():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    bn = model[1]
    tb = TrainerBypass(morphc.Schedule(at=[2]), bypass_steps=4, return_steps=2, verbose=False)
    tb.attach(model, opt)
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    seen = []
    for step in range(1, 6):
        before = {k: v.clone() for k, v in bn.named_buffers()}
        tb.before_micro_batch()
        s = float(tb.extended.homotopy) if tb.in_cycle else None
        loss = F.mse_loss(model(x), y)
        tb.record_loss(loss)
        loss.backward()
        opt.step()
        opt.zero_grad()
        tb.after_step(step)
        moved = any(not torch.equal(v, before[k]) for k, v in bn.named_buffers())
        seen.append((s, moved))
    free = [(s, moved) for s, moved in seen if s is not None]
    assert (1.0, False) in free, "an s = 1 micro-batch leaves the statistics alone"
    assert (0.0, True) in free, "an s = 0 micro-batch updates them"
    assert all(moved for s, moved in seen if s is None), "plain steps update them"
    tb.finish()


def test_trainer_bypass_refuses_what_needs_its_own_loop():
    with pytest.raises(morphc.BypassError, match="not available inside a trainer"):
        TrainerBypass(eval_closure=lambda m: 0)
    with pytest.raises(morphc.BypassError, match="fixed length"):
        TrainerBypass(max_bypass_steps=400)
    with pytest.raises(morphc.BypassError, match="penalty"):
        TrainerBypass(return_mode="penalty")
    bp = TrainerBypass(sites="nothing_like_this")
    model = nn.Linear(2, 2)
    with pytest.raises(SiteError, match="no site matches"):
        bp.attach(model, torch.optim.SGD(model.parameters(), lr=0.1))


def test_a_step_without_a_recorded_loss_says_how_to_record_it():
    bp = TrainerBypass()
    model = nn.Sequential(nn.Linear(2, 2))
    bp.attach(model, torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(morphc.BypassError, match=r"callback.bypass.record_loss\(loss\)"):
        bp.after_step(1)
    bp.record_loss(torch.tensor(0.5))
    bp.after_step(1)                   # with the loss recorded, the step goes through
    bp.finish()


@pytest.mark.parametrize("name, extra", [("hf", "transformers"), ("lightning", "lightning")])
def test_missing_extra_says_what_to_install(monkeypatch, name, extra):
    import importlib
    import sys

    monkeypatch.setitem(sys.modules, extra, None)
    monkeypatch.setitem(sys.modules, "lightning.pytorch", None)
    monkeypatch.delitem(sys.modules, f"morphc.integrations.{name}", raising=False)
    with pytest.raises(ImportError, match=rf"morphc\[{name}\]"):
        importlib.import_module(f"morphc.integrations.{name}")


def _state(model, optimizer):
    """Every parameter, buffer and optimizer-state tensor, cloned (for bit-identity checks)."""
    params = {k: v.detach().clone() for k, v in model.state_dict().items()}
    opt = {n: {k: (v.clone() if torch.is_tensor(v) else v) for k, v in optimizer.state[p].items()}
           for n, p in model.named_parameters() if p in optimizer.state}
    return params, opt


def _same(a, b) -> bool:
    (pa, oa), (pb, ob) = a, b
    if pa.keys() != pb.keys() or oa.keys() != ob.keys():
        return False
    if not all(torch.equal(pa[k], pb[k]) for k in pa):
        return False
    return all(oa[n].keys() == ob[n].keys() and
               all(torch.equal(oa[n][k], ob[n][k]) if torch.is_tensor(oa[n][k])
                   else oa[n][k] == ob[n][k] for k in oa[n]) for n in oa)


@pytest.fixture
def never_pays(monkeypatch):
    monkeypatch.setattr(Cycle, "pays", lambda self, before, after: False)


@pytest.fixture
def fold_outputs(monkeypatch):
    """Wrap the fold: the whole model's output on a fixed batch, just before and just after
    (autocast off, eval mode), so contraction is checked end to end, not per site only."""
    records: list[float] = []
    probe: dict = {}
    original = InPlaceExtension.fold

    def outputs(model):
        was = model.training
        model.eval()
        try:
            # accelerate's bf16 patch of model.forward re-enters autocast: call the class's
            with torch.no_grad(), torch.autocast("cpu", enabled=False):
                out = type(model).forward(model, **probe["kwargs"])
        finally:
            model.train(was)
        return out["logits"] if isinstance(out, dict) else out

    def fold(self):
        before = outputs(self.model)
        deviation = original(self)
        records.append(relative_deviation(before, outputs(self.model)))
        return deviation

    monkeypatch.setattr(InPlaceExtension, "fold", fold)
    return records, probe


# -- Hugging Face Trainer ------------------------------------------------------------------------
def _hf_args(out, **overrides):
    transformers = pytest.importorskip("transformers")
    options = dict(output_dir=str(out), max_steps=16, per_device_train_batch_size=4,
                   gradient_accumulation_steps=2, learning_rate=2e-3,
                   lr_scheduler_type="linear", save_strategy="steps", save_steps=15,
                   report_to=[], use_cpu=True, disable_tqdm=True, logging_steps=100, seed=0,
                   dataloader_num_workers=0)
    options.update(overrides)
    return transformers.TrainingArguments(**options)


def _events(history, kind):
    return [e for e in history if e["event"] == kind]


def test_hf_trainer_cycles_with_accumulation_and_checkpoints(tmp_path, fold_outputs):
    """Two forced cycles in a real HF Trainer (gradient accumulation 2, AdamW, linear LambdaLR):
    one extends and contracts on its own schedule, the other is in flight when checkpoint-15 is
    due and is folded first; the checkpoint has the user's keys only and resumes."""
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import load_file

    from morphc.integrations.hf import BypassCallback

    records, probe = fold_outputs
    model = tiny_gpt2()
    probe["kwargs"] = {"input_ids": TokenData().ids[:4]}
    keys, params = list(model.state_dict()), list(model.parameters())
    callback = BypassCallback(morphc.Schedule(at=[2, 11]), bypass_steps=2, return_steps=3,
                              accept="always", width=4, min_lr_fraction=0.0, verbose=False)
    args = _hf_args(tmp_path)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=TokenData(),
                                   callbacks=[callback])
    trainer.train()
    history = callback.history
    assert [(e["event"], e["step"]) for e in history] == [
        ("extend", 2), ("return", 4), ("contract", 7), ("extend", 11), ("return", 13),
        ("contract", 15)]
    first, second = _events(history, "contract")
    assert first["reason"] is None and "checkpoint" in second["reason"]
    assert second["window"] == 2                # judged on the two return steps it had
    assert "transformer.h.0.attn.c_attn" in first["sites"]
    assert not any("lm_head" in s for s in first["sites"])      # tied to the embedding
    assert max(e["deviation"] for e in (first, second)) <= 1e-5
    assert len(records) == 2 and max(records) <= 1e-5           # whole model, before/after fold
    # the user's own object, keys and Parameters; no hook left behind
    assert trainer.model is model and list(model.state_dict()) == keys
    assert list(model.parameters()) == params
    assert not any(m._forward_hooks for m in model.modules())
    # checkpoint-15 was written right after the in-flight cycle was folded
    ck = tmp_path / "checkpoint-15"
    saved = load_file(str(ck / "model.safetensors"))
    assert set(saved) <= set(keys) and "transformer.h.0.attn.c_attn.weight" in saved
    opt = torch.load(ck / "optimizer.pt", weights_only=True)
    assert len(opt["param_groups"]) == len(trainer.optimizer.param_groups) == 2
    n_params = sum(len(g["params"]) for g in opt["param_groups"])
    assert n_params == len(params)
    # it resumes in a fresh Trainer, with the callback
    resumed = BypassCallback(morphc.Schedule(at=[2, 11]), bypass_steps=2, return_steps=3,
                             accept="always", width=4, min_lr_fraction=0.0, verbose=False)
    again = transformers.Trainer(model=tiny_gpt2(), args=_hf_args(tmp_path / "r"),
                                 train_dataset=TokenData(), callbacks=[resumed])
    again.train(resume_from_checkpoint=str(ck))
    assert again.state.global_step == 16


class _Recorder:
    """An HF callback that clones the model and optimizer state at given steps' on_step_end."""

    def __init__(self, steps):
        import transformers

        class Recorder(transformers.TrainerCallback):
            def on_step_end(inner, args, state, control, model=None, optimizer=None, **kw):
                if state.global_step in steps:
                    raw = morphc.integrations.core.raw_optimizer(optimizer)
                    self.states[state.global_step] = _state(model, raw)

        self.states: dict[int, tuple] = {}
        self.callback = Recorder()


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_hf_cycle_that_does_not_pay_is_rolled_back_bit_identically(tmp_path, never_pays, bf16):
    """Also under bf16 autocast (accelerate's patched forward): the rollback restores weights,
    buffers and optimizer state bit for bit."""
    transformers = pytest.importorskip("transformers")
    from morphc.integrations.hf import BypassCallback

    if bf16 and _bf16_ok():
        pytest.skip(_bf16_ok())
    model = tiny_gpt2()
    before, after = _Recorder({3}), _Recorder({8})
    # shadow=False: the state from before the cycle (with plain training beside the cycle, a
    # miss hands plain training's over: test_outside_trainers2.py)
    callback = BypassCallback(morphc.Schedule(at=[3]), bypass_steps=2, return_steps=3, width=4,
                              min_lr_fraction=0.0, shadow=False, verbose=False)
    trainer = transformers.Trainer(
        model=model, args=_hf_args(tmp_path, max_steps=10, save_strategy="no", bf16=bf16),
        train_dataset=TokenData(), callbacks=[before.callback, callback, after.callback])
    trainer.train()
    assert [(e["event"], e["step"]) for e in callback.bypass.history] == [
        ("extend", 3), ("return", 5), ("rollback", 8)]
    assert "did not pay" in callback.bypass.history[-1]["reason"]
    assert _same(before.states[3], after.states[8])


def _bf16_ok() -> str | None:
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            torch.ones(2, 2) @ torch.ones(2, 2)
    except Exception as exc:   # pragma: no cover - depends on the CPU
        return f"bf16 autocast unavailable on this CPU: {exc}"
    return None


def test_hf_bf16_autocast(tmp_path, fold_outputs):
    """bf16=True: accelerate patches model.forward with autocast; the extension (hooks on the
    site modules) trains under it and folds exactly (checked in fp32, autocast off)."""
    transformers = pytest.importorskip("transformers")
    from morphc.integrations.hf import BypassCallback

    reason = _bf16_ok()
    if reason:
        pytest.skip(reason)
    records, probe = fold_outputs
    model = tiny_gpt2()
    probe["kwargs"] = {"input_ids": TokenData().ids[:4]}
    callback = BypassCallback(morphc.Schedule(at=[2]), bypass_steps=2, return_steps=3,
                              accept="always", width=4, min_lr_fraction=0.0, verbose=False)
    try:
        args = _hf_args(tmp_path, bf16=True, max_steps=8, save_strategy="no")
    except (ValueError, ImportError) as exc:
        pytest.skip(f"this transformers/CPU does not run bf16: {exc}")
    trainer = transformers.Trainer(model=model, args=args, train_dataset=TokenData(),
                                   callbacks=[callback])
    trainer.train()
    assert "forward" in model.__dict__        # accelerate's autocast wrapper, left in place
    contract = _events(callback.bypass.history, "contract")
    assert len(contract) == 1 and contract[0]["deviation"] <= 1e-5
    assert records and records[0] <= 1e-5


# -- Lightning -----------------------------------------------------------------------------------
def _lightning_module(**kwargs):
    pl = pytest.importorskip("lightning.pytorch")

    class Module(pl.LightningModule):
        def __init__(self, scheduler=True):
            super().__init__()
            self.scheduler = scheduler
            self.net = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(),
                                     nn.Linear(16, 1))

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.mse_loss(self(x).squeeze(-1), y)

        def configure_optimizers(self):
            opt = torch.optim.AdamW(self.parameters(), lr=1e-2)
            if not self.scheduler:
                return opt
            sch = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / 100)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sch, "interval": "step"}}

    torch.manual_seed(0)
    return Module(**kwargs)


def _loader():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(128, 4, generator=g)
    y = torch.sin(x.sum(-1))
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)


def _pl_trainer(tmp_path, callbacks, **overrides):
    pl = pytest.importorskip("lightning.pytorch")
    options = dict(max_steps=16, accumulate_grad_batches=2, accelerator="cpu", devices=1,
                   logger=False, enable_progress_bar=False, enable_model_summary=False,
                   default_root_dir=str(tmp_path), callbacks=callbacks)
    options.update(overrides)
    return pl.Trainer(**options)


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_lightning_cycles_with_accumulation_and_checkpoints(tmp_path, precision, fold_outputs):
    pl = pytest.importorskip("lightning.pytorch")
    from lightning.pytorch.callbacks import ModelCheckpoint

    from morphc.integrations.lightning import BypassCallback

    if precision.startswith("bf16") and _bf16_ok():
        pytest.skip(_bf16_ok())
    records, probe = fold_outputs
    module = _lightning_module()
    probe["kwargs"] = {"x": torch.randn(8, 4)}
    keys, params = list(module.state_dict()), list(module.parameters())
    callback = BypassCallback(morphc.Schedule(at=[2, 9]), bypass_steps=2, return_steps=3,
                              accept="always", width=4, min_lr_fraction=0.0, verbose=False)
    checkpoints = ModelCheckpoint(dirpath=str(tmp_path / "ck"), every_n_train_steps=12,
                                  save_top_k=-1)
    trainer = _pl_trainer(tmp_path, [callback, checkpoints], precision=precision)
    trainer.fit(module, _loader())
    history = callback.history
    assert [(e["event"], e["step"]) for e in history] == [
        ("extend", 2), ("return", 4), ("contract", 7), ("extend", 9), ("return", 11),
        ("contract", 12)]
    assert "checkpoint" in history[-1]["reason"]
    assert max(e["deviation"] for e in _events(history, "contract")) <= 1e-5
    assert len(records) == 2 and max(records) <= 1e-5
    assert list(module.state_dict()) == keys and list(module.parameters()) == params
    assert not any(m._forward_hooks for m in module.modules())
    # loss read from outputs, multiplied back from Lightning's 1/accumulate scaling
    assert 0.05 < history[-1]["loss_before"] < 2.0
    (path,) = sorted((tmp_path / "ck").glob("*.ckpt"))
    ckpt = torch.load(path, weights_only=False)
    assert list(ckpt["state_dict"]) == keys
    assert len(ckpt["optimizer_states"][0]["param_groups"]) == 1
    assert len(ckpt["optimizer_states"][0]["state"]) == len(params)
    # resumes, with the callback's trigger and counters restored
    resumed = BypassCallback(morphc.Schedule(at=[2, 9]), bypass_steps=2, return_steps=3,
                             accept="always", width=4, min_lr_fraction=0.0, verbose=False)
    again = _pl_trainer(tmp_path / "r", [resumed], max_steps=14, enable_checkpointing=False)
    again.fit(_lightning_module(), _loader(), ckpt_path=str(path))
    assert again.global_step == 14 and resumed.bypass.cycle == 2
    assert pl is not None


def test_lightning_cycle_that_does_not_pay_is_rolled_back_bit_identically(tmp_path, never_pays):
    pl = pytest.importorskip("lightning.pytorch")
    from morphc.integrations.lightning import BypassCallback

    states: dict[int, tuple] = {}

    class Recorder(pl.Callback):
        def __init__(self, step):
            self.step = step

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            if trainer.global_step == self.step and self.step not in states:
                states[self.step] = _state(module, trainer.optimizers[0])

    module = _lightning_module(scheduler=False)
    # shadow=False: the state from before the cycle (with plain training beside the cycle, a
    # miss hands plain training's over: test_outside_trainers2.py)
    callback = BypassCallback(morphc.Schedule(at=[3]), bypass_steps=2, return_steps=3, width=4,
                              min_lr_fraction=0.0, shadow=False, verbose=False)
    # step 3 recorded before the extension, step 8 after the rollback (callbacks run in order)
    trainer = _pl_trainer(tmp_path, [Recorder(3), callback, Recorder(8)], max_steps=10,
                          enable_checkpointing=False)
    trainer.fit(module, _loader())
    assert [(e["event"], e["step"]) for e in callback.bypass.history] == [
        ("extend", 3), ("return", 5), ("rollback", 8)]
    assert _same(states[3], states[8])


def test_the_extension_follows_the_group_that_trains_when_group_0_is_held_at_lr_0():
    """A fine-tuning optimizer whose group 0 (a held backbone) has lr 0: at its lr the branches
    would never leave B = 0; they follow the first group that trains instead."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    opt = torch.optim.SGD([{"params": model[0].parameters(), "lr": 0.0},
                           {"params": model[2].parameters(), "lr": 0.05}])
    tb = TrainerBypass(morphc.Schedule(at=[2]), bypass_steps=3, return_steps=2, verbose=False)
    tb.attach(model, opt)
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    lrs = []
    for step in range(1, 5):
        tb.before_micro_batch()
        loss = F.mse_loss(model(x), y)
        tb.record_loss(loss)
        loss.backward()
        opt.step()
        if tb.in_cycle:
            lrs.append(tb._cycle.group.group["lr"])
        opt.zero_grad()
        tb.after_step(step)
    tb.finish()
    assert lrs and all(lr == pytest.approx(0.05) for lr in lrs)


def test_a_trainer_plateau_at_a_decayed_but_steady_lr_starts_a_cycle():
    """As in Bypass: below half its peak but held still (ReduceLROnPlateau, a step decay), a flat
    loss is the model's plateau, not a schedule's tail."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tb = TrainerBypass(morphc.Plateau(window=3), bypass_steps=2, return_steps=2,
                       accept="always", verbose=False)
    tb.attach(model, opt)
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    for step in range(1, 20):
        if step == 2:
            opt.param_groups[0]["lr"] = 0.025
        tb.before_micro_batch()
        loss = F.mse_loss(model(x), y) * 0.0 + 1.0        # flat: the trigger fires when allowed
        tb.record_loss(loss)
        loss.backward()
        opt.step()
        opt.zero_grad()
        tb.after_step(step)
    tb.finish()
    starts = [e["step"] for e in tb.history if e["event"] == "extend"]
    assert starts and starts[0] >= 2 + 2 * 3


def test_a_maximised_objective_still_rising_starts_no_cycle_in_a_trainer():
    """A trainer whose optimizer has ``maximize=True`` records the objective it raises: read as
    a loss, a rising objective stalled the trigger and started cycles on healthy training."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 6, generator=gen), torch.randn(64, 3, generator=gen)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, maximize=True)
    tb = TrainerBypass(morphc.Plateau(window=10), bypass_steps=5, return_steps=5, verbose=False)
    tb.attach(model, opt)
    for step in range(1, 121):
        tb.before_micro_batch()
        objective = -F.mse_loss(model(x), y)
        tb.record_loss(objective)
        objective.backward()
        opt.step()
        opt.zero_grad()
        tb.after_step(step)
    assert not any(e["event"] == "extend" for e in tb.history)
    tb.finish()


def test_a_trainer_refuses_param_groups_that_disagree_on_maximize():
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    opt = torch.optim.Adam([{"params": model[0].parameters(), "maximize": True},
                            {"params": model[2].parameters()}], lr=1e-3)
    with pytest.raises(morphc.BypassError, match="disagree on maximize"):
        TrainerBypass(verbose=False).attach(model, opt)
