"""prot_lib.callbacks on a plain LightningModule (not prot_lib's), under BOTH Lightning namespaces:
``lightning.pytorch`` and ``pytorch_lightning``.

Each test is parametrized by namespace: the module, the Trainer and Lightning's own callbacks come from that
namespace, the callbacks under test are the same ``prot_lib.callbacks`` classes. The regressor is a small
MLP; faults are planted with ``InjectFault`` or the helpers below at known steps.
"""
from __future__ import annotations

import importlib
import math
import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch
import numpy as np
import pytest
import pytorch_lightning
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from prot_lib.callbacks import (AdaptiveGradientClipping, DataGuard, FiniteCheckpoint, GradNormMonitor,
                                NonFiniteGuard, NonFiniteTrainingError, ZClip)
from prot_lib.data import DataError
from prot_lib.diagnostics import InjectFault, autopsy_bundle
from prot_lib.diagnostics.grads import total_grad_norm

NAMESPACES = ["lightning.pytorch", "pytorch_lightning"]
N, F_IN = 64, 4


class _Regressor:
    """y = MLP(x): x (batch, 4) -> (batch,). A user's model: nothing of prot_lib in it."""

    def __init__(self, lr: float = 0.05, hidden: int = 8):
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(F_IN, hidden), nn.Tanh(), nn.Linear(hidden, 1))

    def forward(self, x):
        return self.net(x).squeeze(-1)

    def training_step(self, batch, batch_idx):
        x, y = batch[0], batch[1]
        loss = F.mse_loss(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", F.mse_loss(self(batch[0]), batch[1]))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


class LplRegressor(_Regressor, lightning.pytorch.LightningModule):
    pass


class PtlRegressor(_Regressor, pytorch_lightning.LightningModule):
    pass


MODULES = {"lightning.pytorch": LplRegressor, "pytorch_lightning": PtlRegressor}


@pytest.fixture(params=NAMESPACES)
def ns(request):
    return request.param


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    # a guard without bundle_dir under a Trainer without a logger writes its bundles to the working directory
    monkeypatch.chdir(tmp_path)


def data(n=N, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, F_IN, generator=g)
    return x, (x[:, 0] - 2 * x[:, 1]).clone()


def loader(x, y, *extra, batch_size=8):
    return DataLoader(TensorDataset(x, y, *extra), batch_size=batch_size, shuffle=False)


def fit(ns, callbacks, max_steps=8, x=None, y=None, root=None, val=False, seed=0, module=None, **trainer_kw):
    pl = importlib.import_module(ns)
    pl.seed_everything(seed, verbose=False)
    module = module or MODULES[ns]()
    if x is None:
        x, y = data()
    kw = dict(accelerator="cpu", devices=1, max_steps=max_steps, logger=False, enable_progress_bar=False,
              enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0,
              default_root_dir=str(root) if root else None)
    kw.update(trainer_kw)
    trainer = pl.Trainer(callbacks=callbacks, limit_val_batches=None if val else 0, **kw)
    trainer.fit(module, loader(x, y), loader(x, y) if val else None)
    return trainer, module


class Spy(pytorch_lightning.Callback, lightning.pytorch.Callback):
    """Independent measurements: pre-clip norm (first in on_before_optimizer_step), the norm the update
    used (optimizer post-hook), and state/optimizer copies at every step start."""

    def __init__(self):
        self.pre, self.post, self.states, self.opt_states, self._h = [], [], [], [], None

    def on_train_start(self, trainer, pl_module):
        def hook(optimizer, args, kwargs):
            self.post.append(float(total_grad_norm([p for p in pl_module.parameters()])))
        self._h = trainer.optimizers[0].register_step_post_hook(hook)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.states.append({k: v.clone() for k, v in pl_module.state_dict().items()})
        opt = trainer.optimizers[0]
        self.opt_states.append({i: {k: v.clone() for k, v in opt.state[p].items()}
                                for i, p in enumerate(pl_module.parameters()) if p in opt.state})

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.pre.append(float(total_grad_norm(list(pl_module.parameters()))))

    def on_train_end(self, trainer, pl_module):
        self._h.remove()


class ScaleGrads(pytorch_lightning.Callback, lightning.pytorch.Callback):
    """Multiply (or set) every gradient at the given steps, before the callbacks listed after it."""

    def __init__(self, steps, factor=None, value=None):
        self.steps, self.factor, self.value = set(steps), factor, value

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_step in self.steps:
            for p in pl_module.parameters():
                if p.grad is not None:
                    p.grad.fill_(self.value) if self.value is not None else p.grad.mul_(self.factor)


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------------ both namespaces

def test_every_callback_is_a_callback_of_both_namespaces(ns, tmp_path):
    pl = importlib.import_module(ns)
    cbs = [NonFiniteGuard(), GradNormMonitor(), AdaptiveGradientClipping(), DataGuard(),
           FiniteCheckpoint(dirpath=tmp_path)]
    assert all(isinstance(cb, pl.Callback) for cb in cbs)
    ck = cbs[-1]
    assert isinstance(ck, pl.callbacks.Checkpoint)
    # a single callback (not in a list) is wrapped by the Trainer only if it is its namespace's Callback,
    # and the checkpoint callback is found only if it is its namespace's Checkpoint
    trainer = pl.Trainer(callbacks=cbs[0], logger=False, enable_checkpointing=False)
    assert cbs[0] in trainer.callbacks
    trainer = pl.Trainer(callbacks=[ck, cbs[1]], logger=False, enable_checkpointing=True)
    assert trainer.checkpoint_callback is ck and trainer.checkpoint_callbacks == [ck]
    assert trainer.callbacks[-1] is ck  # Lightning orders checkpoint callbacks last


def test_monitor_sees_the_pre_clip_norm_with_gradient_clip_val(ns, tmp_path):
    spy, mon = Spy(), GradNormMonitor(per_parameter=True)
    rows = []

    class Record(pytorch_lightning.Callback, lightning.pytorch.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            rows.append(dict(mon.last))

    pl = importlib.import_module(ns)
    fit(ns, [spy, NonFiniteGuard("stop"), mon, Record()], max_steps=6, gradient_clip_val=0.05,
        logger=pl.loggers.CSVLogger(str(tmp_path), name="", version=""), log_every_n_steps=1)
    before = [r["grad_norm_before_clip"] for r in rows]
    after = [r["grad_norm_after_clip"] for r in rows]
    np.testing.assert_allclose(before, spy.pre, rtol=1e-12)  # measured before Lightning clipped
    np.testing.assert_allclose(after, spy.post, rtol=1e-6)    # what the update used
    assert min(before) > 0.05 and max(after) <= 0.05 * (1 + 1e-5)
    per = rows[0]["before"]
    assert set(per) == {"net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias"}
    assert math.sqrt(sum(v * v for v in per.values())) == pytest.approx(before[0], rel=1e-6)  # float32 total
    import pandas as pd
    m = pd.read_csv(tmp_path / "metrics.csv").dropna(subset=["grad_norm_before_clip"])
    assert m["step"].tolist() == list(range(6))
    np.testing.assert_allclose(m["grad_norm_before_clip"], before, rtol=1e-6)
    assert "grad_norm_before_clip/net.0.weight" in m and "grad_norm_after_clip/net.0.weight" in m


def test_stop_names_the_module_and_the_bundle_replays_a_users_model(ns, tmp_path):
    guard = NonFiniteGuard("stop", bundle_dir=tmp_path / "bundles")
    with pytest.raises(NonFiniteTrainingError) as e:
        fit(ns, [InjectFault(3, "weight", "net.2.weight", math.inf), guard], gradient_clip_val=1.0)
    err, rep = e.value, e.value.report
    assert err.step == 3 and rep.reasons == ["loss", "grad"]
    assert (rep.phase, rep.module) == ("forward", "net.2")  # names relative to the user's LightningModule
    assert rep.nonfinite_params == ["net.2.weight"] and "own parameters" in rep.verdict()
    assert err.bundle_path == tmp_path / "bundles" / "nonfinite_step3.pt"
    assert str(autopsy_bundle(err.bundle_path)) == str(rep)
    # a fresh process replays the bundle: it rebuilds the model from its class path and hparams
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, "-m", "prot_lib", "autopsy", str(err.bundle_path)], capture_output=True,
                       text=True, env=env, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(rep).strip()


def test_skip_drops_the_update_and_leaves_the_optimizer_state_untouched(ns):
    spy, guard = Spy(), NonFiniteGuard("skip")
    trainer, module = fit(ns, [spy, InjectFault(4, "grad", "net.0.weight", math.nan), guard], max_steps=7,
                          gradient_clip_val=1.0)
    assert (guard.n_skipped, guard.first_step, guard.last_action) == (1, 4, "step")
    # the state at the start of step 5 is the state at the start of step 4: weights, Adam's moments and step
    assert _same(spy.states[5], spy.states[4]) and not _same(spy.states[4], spy.states[3])
    assert spy.opt_states[5].keys() == spy.opt_states[4].keys()
    assert all(_same(spy.opt_states[5][i], spy.opt_states[4][i]) for i in spy.opt_states[4])
    assert int(spy.opt_states[4][0]["step"]) == 4  # Adam counted steps 0-3 only
    assert guard.first_report.reasons == ["grad"] and guard.first_bundle.is_file()


def test_rollback_restores_the_last_good_weights_and_optimizer_state_and_cuts_the_lr(ns):
    spy, guard = Spy(), NonFiniteGuard("rollback", lr_factor=0.25)
    trainer, module = fit(ns, [spy, InjectFault(5, "weight", "net.0.weight", math.nan), guard], max_steps=8,
                          gradient_clip_val=1.0)
    assert guard.n_rollbacks == 1 and guard.first_step == 5
    # rollback_every=1: the last good copy was taken at step 4, before its update: step 6 starts there
    assert _same(spy.states[6], spy.states[4])
    assert all(_same(spy.opt_states[6][i], spy.opt_states[4][i]) for i in spy.opt_states[4])
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.05 * 0.25)
    assert all(torch.isfinite(p).all() for p in module.parameters())


def test_skip_gives_up_after_max_consecutive(ns, tmp_path):
    x, y = data()
    y[:] = math.nan  # every batch: NaN loss
    guard = NonFiniteGuard("skip", max_consecutive=3, bundle_dir=tmp_path)
    with pytest.raises(NonFiniteTrainingError, match="3 non-finite steps in a row") as e:
        fit(ns, [guard], x=x, y=y)
    assert (e.value.step, guard.n_skipped) == (0, 2)  # autopsy of the first of the three
    assert e.value.report.phase == "loss" and "targets are non-finite" in e.value.report.verdict()


def test_a_float32_overflow_of_the_norm_alone_does_not_stop_training(ns):
    # every gradient element 1e20: finite, but the float32 norm of 41 of them overflows (torch's own
    # get_total_norm says inf). Summed in float64 the norm is finite: the guard lets the step through.
    mon, guard, seen = GradNormMonitor(), NonFiniteGuard("stop"), {}

    class Float32Norm(pytorch_lightning.Callback, lightning.pytorch.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            if trainer.global_step == 2:
                seen["f32"] = float(torch.nn.utils.get_total_norm([p.grad for p in pl_module.parameters()]))

    fit(ns, [ScaleGrads([2], value=1e20), Float32Norm(), guard, mon], max_steps=3,
        module=MODULES[ns](lr=1e-30))
    n_params = sum(p.numel() for p in MODULES[ns]().parameters())
    assert seen["f32"] == math.inf and guard.first_step is None and guard.last_action == "step"
    assert mon.last["step"] == 2 and mon.last["grad_norm_before_clip"] == pytest.approx(1e20 * math.sqrt(n_params), rel=1e-6)


def test_data_guard_names_batch_sample_and_feature(ns):
    x, y = data()
    x[21, 2] = math.nan  # batch 2 (batch size 8), sample 5 of that batch, feature 'c'
    with pytest.raises(DataError) as e:
        fit(ns, [DataGuard(feature_names=["a", "b", "c", "d"])], x=x, y=y)
    assert str(e.value) == "non-finite input in batch 2 (epoch 0), sample 5 of the batch, feature 'c' (index 2): nan"
    # with each sample's dataset row in the batch, the row and its id are named
    rows = torch.arange(N)
    ids = [f"R{i:03d}" for i in range(N)]
    pl = importlib.import_module(ns)
    trainer = pl.Trainer(max_steps=8, logger=False, enable_progress_bar=False, enable_checkpointing=False,
                         callbacks=[DataGuard(["a", "b", "c", "d"], sample_index=2, row_ids=ids)])
    with pytest.raises(DataError, match=r"^non-finite input in batch 2 \(epoch 0\), sample 21 \(row id 'R021'\), "
                                        r"feature 'c' \(index 2\): nan$"):
        trainer.fit(MODULES[ns](), loader(x, y, rows))
    # targets, and a clean run is untouched
    x, y = data()
    y[9] = math.inf
    with pytest.raises(DataError, match=r"^non-finite target in batch 1 \(epoch 0\), sample 1 of the batch: inf$"):
        fit(ns, [DataGuard()], x=x, y=y)


def test_finite_checkpoint_refuses_a_nan_model_and_keeps_the_last_good_file(ns, tmp_path):
    ck = FiniteCheckpoint(dirpath=tmp_path, filename="{step}", every_n_train_steps=1, save_top_k=-1, save_last=True,
                          enable_version_counter=False)
    fit(ns, [InjectFault(4, "weight_after", "net.0.bias"), ck], max_steps=6, enable_checkpointing=True)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["last.ckpt", "step=1.ckpt", "step=2.ckpt", "step=3.ckpt", "step=4.ckpt"]
    assert [r[0] for r in ck.refused] == [5, 6] and ck.refused[0][1] == "weights.net.0.bias"
    last = torch.load(tmp_path / "last.ckpt", weights_only=False)
    assert last["global_step"] == 4 and all(torch.isfinite(v).all() for v in last["state_dict"].values())


def test_adaptive_clipping_state_is_saved_and_restored_with_the_checkpoint(ns, tmp_path):
    clip = AdaptiveGradientClipping("zclip", warmup_steps=3)
    ck = FiniteCheckpoint(dirpath=tmp_path, save_last=True, every_n_train_steps=1, save_top_k=0)
    fit(ns, [clip, ck], max_steps=6, enable_checkpointing=True)
    assert clip.clipper.initialized
    saved = torch.load(tmp_path / "last.ckpt", weights_only=False)["callbacks"]["AdaptiveGradientClipping"]
    assert saved == {"algorithm": "zclip", "clipper": clip.clipper.state_dict()}
    # a resumed run starts with those statistics, not with a new warmup
    resumed, restored = AdaptiveGradientClipping("zclip", warmup_steps=3), {}

    class Peek(pytorch_lightning.Callback, lightning.pytorch.Callback):
        def on_train_start(self, trainer, pl_module):
            restored.update(resumed.clipper.state_dict())

    pl = importlib.import_module(ns)
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(max_steps=7, logger=False, enable_progress_bar=False, enable_checkpointing=False,
                         callbacks=[resumed, Peek()], limit_val_batches=0)
    trainer.fit(MODULES[ns](), loader(*data()), ckpt_path=str(tmp_path / "last.ckpt"))
    assert restored == saved["clipper"] and restored["mean"] is not None


# ------------------------------------------------------------------------------------------ ZClip vs PyPI zclip

ZKW = dict(alpha=0.97, z_thresh=2.5, warmup_steps=5)
SPIKES = [9, 14, 20, 27]  # gradients x30 at these steps: spikes for both implementations to clip


def test_zclip_matches_the_pypi_package():
    """Our ZClip against PyPI ``zclip`` 1.0.0 (bluorion-com), ``mode="zscore",
    clip_option="adaptive_scaling", max_grad_norm=None`` (no fixed ceiling), on one run each from the same
    seed, with the same gradient spikes. Tolerance: thresholds agree to rtol 1e-5 (the package takes the
    norm in float32, we sum in float64, so the two runs drift apart by float rounding only)."""
    from zclip import ZClipLightningCallback

    ours, pre = AdaptiveGradientClipping("zclip", **ZKW), Spy()
    thresholds = []

    class Record(lightning.pytorch.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            thresholds.append(ours.last_threshold)

    fit("lightning.pytorch", [ScaleGrads(SPIKES, factor=30.0), pre, ours, Record()], max_steps=32)
    theirs, pypi = ZClipLightningCallback(max_grad_norm=None, mode="zscore", clip_option="adaptive_scaling", **ZKW), []
    compute = theirs.zclip._compute_clip_val

    def spy(norm):  # what the package decides at each post-warmup step: (its norm, its clip value or None)
        value = compute(norm)
        pypi.append((norm, value))
        return value

    theirs.zclip._compute_clip_val = spy
    fit("lightning.pytorch", [ScaleGrads(SPIKES, factor=30.0), theirs], max_steps=32)
    assert len(pypi) == 32 - ZKW["warmup_steps"]
    ours_post = np.array(thresholds[ZKW["warmup_steps"]:])
    norms = np.array(pre.pre[ZKW["warmup_steps"]:])
    clipped_ours = norms > ours_post
    clipped_theirs = np.array([v is not None for _, v in pypi])
    np.testing.assert_array_equal(clipped_ours, clipped_theirs)
    assert clipped_ours.sum() >= len(SPIKES)  # every spike was clipped
    np.testing.assert_allclose(norms, [n for n, _ in pypi], rtol=1e-5)
    np.testing.assert_allclose(ours_post[clipped_ours], [v for _, v in pypi if v is not None], rtol=1e-5)


def test_zclip_algorithm_equals_the_pypi_package_on_the_same_norms():
    """The same norm sequence fed to both (the package through a one-parameter model whose gradient
    norm is the number): thresholds equal to float rounding (rtol 1e-12)."""
    from zclip import ZClip as PyPIZClip

    rng = np.random.default_rng(0)
    norms = np.abs(rng.normal(1.0, 0.2, 80))
    norms[[30, 45, 46, 70]] *= [20, 8, 15, 50]
    ours, theirs = ZClip(**ZKW), PyPIZClip(max_grad_norm=None, mode="zscore", clip_option="adaptive_scaling", **ZKW)
    p = nn.Parameter(torch.zeros(1, dtype=torch.float64))
    model = nn.Module()
    model.p = p
    got, want = [], []
    for g in norms:
        got.append(ours.threshold(g))
        p.grad = torch.tensor([g], dtype=torch.float64)
        theirs.step(model)
        want.append(float(p.grad.abs()))  # the package scaled the gradient to its clip value, or left it
    got, want = np.array(got[ZKW["warmup_steps"]:]), np.array(want[ZKW["warmup_steps"]:])
    g = norms[ZKW["warmup_steps"]:]
    spikes = g > got
    assert spikes.sum() >= 4
    np.testing.assert_allclose(want[spikes], got[spikes] * g[spikes] / (g[spikes] + 1e-6), rtol=1e-12)
    np.testing.assert_allclose(want[~spikes], g[~spikes], rtol=1e-12)
