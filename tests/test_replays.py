"""Public reports about NaN losses in Mamba-style training, replayed against this library.

One test per report; each asserts the number the report is about:

- hustvl/Vim#30: adding the forward and the flipped backward hidden states "doubles the magnitude per
  layer" -> activation scale over 24 BiMamba layers.
- MzeroMiko/mamba-mini#6: a chunked scan dividing by exp(cumsum(delta * A)) returns NaN for long chunks
  -> our scan on d_state = 16, default A, delta ~ 0.1, L = 64: finite and equal to a float64 loop.
- wongzbb/DiffMa-Diffusion-Mamba#18: NaN in the training arrays gives "occasional" NaN losses -> the NaN
  loss comes exactly at the step whose batch holds the bad row, and the data guard names that row.
- simchowitzlabpublic/nano-world-model#22: clipping called inside ``training_step`` (before backward)
  never clips -> ours clips after backward at every optimizer step, and the logged norm is that step's.
- Lightning-AI/pytorch-lightning#1476, #19534: a warmup scheduler without ``interval="step"`` steps once
  per epoch -> the lr of every optimizer step, against LinearLR's closed form.
"""
from __future__ import annotations

import math

import lightning.pytorch as pl
import numpy as np
import pandas as pd
import pytest
import torch

from prot_lib.data import DataError, load_dataset
from prot_lib.models import S6Regressor, selective_scan
from prot_lib.training import NaNStudyModule, fold_indices, reproduction_config, run_kfold, total_grad_norm
from prot_lib.training.kfold import make_loaders


@pytest.fixture(autouse=True)
def _no_run_cache_one_thread(monkeypatch):
    monkeypatch.delenv("PROT_LIB_CACHE", raising=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: on a loaded 2-core machine 2 threads are ~100x slower
    yield
    torch.set_num_threads(threads)


# --- hustvl/Vim#30 ---------------------------------------------------------------------------------


def _growth(norm, combine, seed, scale):
    torch.manual_seed(seed)
    model = S6Regressor(4, d_model=16, n_layers=24, norm=norm, combine=combine, backend="torch",
                        topology="layers")
    x = scale * torch.randn(8, 16, 4, generator=torch.Generator().manual_seed(100 + seed))
    s = model.activation_scales(x)
    return s["layer23"] / s["layer0"] if math.isfinite(s["layer23"]) else math.inf


def test_vim_30_adding_both_directions_does_not_double_the_stream_per_layer():
    # The sum f + b is exactly twice the mean (same weights): the doubling is real for the *update* ...
    torch.manual_seed(0)
    add = S6Regressor(4, d_model=16, n_layers=1, combine="add", backend="torch", topology="layers").bimamba.layers[0]
    mean = S6Regressor(4, d_model=16, n_layers=1, combine="mean", backend="torch", topology="layers").bimamba.layers[0]
    mean.load_state_dict(add.state_dict())
    h = torch.randn(2, 12, 16)
    with torch.no_grad():
        torch.testing.assert_close(add(h) - h, 2 * (mean(h) - h), rtol=1e-5, atol=1e-6)
    # ... but not for the residual stream: doubling per layer would be 2**23 ~ 8e6 from layer 0 to 23.
    # Measured (torch 2.13 CPU) at unit-scale input, seeds 0-2, last/first layer:
    # add 1.17, 1.18, 1.00; mean 1.08, 1.07, 1.00; with LayerNorm add 1.13, 1.14, 0.96.
    for norm in (None, "layernorm"):
        for combine in ("add", "mean"):
            ratios = [_growth(norm, combine, seed, 1.0) for seed in range(3)]
            assert all(r < 1.3 for r in ratios), (norm, combine, ratios)  # per layer < 1.3**(1/23) = 1.012
    # At input scale 5 the un-normalised add stack does overflow (2 of 3 seeds: a threshold
    # instability, not a doubling); the LayerNorm stack (model.norm: layernorm) stays flat: 1.04, 1.00, 0.98.
    plain = [_growth(None, "add", seed, 5.0) for seed in range(3)]
    normed = [_growth("layernorm", "add", seed, 5.0) for seed in range(3)]
    assert sum(math.isinf(r) for r in plain) >= 1, plain
    assert all(0.9 < r < 1.1 for r in normed), normed


# --- MzeroMiko/mamba-mini#6 -------------------------------------------------------------------------


def test_mamba_mini_6_long_chunk_is_finite_and_exact():
    batch, d_inner, d_state, L = 2, 4, 16, 64
    g = torch.Generator().manual_seed(6)
    u = torch.randn(batch, d_inner, L, generator=g)
    delta = 0.1 + 0.01 * torch.rand(batch, d_inner, L, generator=g)
    A = -torch.arange(1, d_state + 1, dtype=torch.float32).repeat(d_inner, 1)  # Mamba's S4D-real init
    B = torch.randn(batch, d_state, L, generator=g)
    C = torch.randn(batch, d_state, L, generator=g)
    # the report's closed form: h_t = exp(S_t) * sum_{s<=t} exp(-S_s) delta_s B_s u_s, S = cumsum(delta A)
    S = torch.einsum("bdl,dn->bdnl", delta, A).cumsum(-1)
    assert S.min() < -100  # exp(-S) overflows float32 (> 88.7) within the 64 steps
    dBu = torch.einsum("bdl,bnl,bdl->bdnl", delta, B, u)
    h_closed = torch.exp(S) * torch.cumsum(dBu * torch.exp(-S), dim=-1)
    y_closed = torch.einsum("bdnl,bnl->bdl", h_closed, C)
    assert torch.isnan(y_closed).any()  # 0 * inf: the reported NaN
    # an independent float64 loop of the recurrence h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t
    h = torch.zeros(batch, d_inner, d_state, dtype=torch.float64)
    ys = []
    for t in range(L):
        dt = delta[:, :, t, None].double()
        h = torch.exp(dt * A.double()) * h + dt * B[:, None, :, t].double() * u[:, :, t, None].double()
        ys.append((h * C[:, None, :, t].double()).sum(-1))
    expected = torch.stack(ys, dim=-1)
    got = selective_scan(u, delta, A, B, C)
    assert torch.isfinite(got).all()
    err = (got.double() - expected).abs().max() / expected.abs().max()
    assert err < 1e-6, float(err)


# --- wongzbb/DiffMa-Diffusion-Mamba#18 --------------------------------------------------------------


def test_diffma_18_nan_row_gives_nan_loss_at_its_batch_and_the_guard_names_it(tmp_path):
    data = load_dataset("ishigami")
    cfg = reproduction_config("ishigami", "clip")
    t = cfg.training
    train_idx, _ = fold_indices(len(data), t.k_fold, t.seed)[0]
    bad_row = int(train_idx[500])
    data.x[bad_row, 1, 2] = float("nan")  # one value of one training row
    # where that row lands: the batch of the run's own (seeded) train loader that holds it
    train_dl, _ = make_loaders(data, train_idx, train_idx[:1], t.batch_size, seed=t.seed + 0)
    expected_step = next(i for i, (x, _) in enumerate(train_dl) if torch.isnan(x).any())
    assert expected_step > 0
    res = run_kfold(cfg, folds=[0], data=data, max_steps=expected_step + 3,
                    run_dir=tmp_path / "r", progress=False)
    assert res.fold_summary(0)["first_nonfinite_loss_step"] == expected_step
    assert res.history["loss_finite"].iloc[:expected_step].all()  # "occasional": finite until that batch
    with pytest.raises(DataError) as err:
        run_kfold(cfg.updated({"training.data_guard": True}), folds=[0], data=data,
                  max_steps=expected_step + 3, run_dir=tmp_path / "g", progress=False)
    row_id = data.meta["row_ids"][bad_row]
    # the guard names the batch (its index in epoch 0 is the step of the NaN loss), the row and the feature
    assert str(err.value) == (f"non-finite input in batch {expected_step} (epoch 0), sample {bad_row} "
                              f"(row id {row_id!r}), feature {data.feature_names[2]!r} (index 2), token 1: nan")


# --- simchowitzlabpublic/nano-world-model#22 --------------------------------------------------------


class _IndependentNorms(pl.Callback):
    """Total gradient norm before clipping (on_before_optimizer_step) and of the gradients the update
    used (an optimizer step *post*-hook: Lightning passes its closure, which runs forward, backward and
    clipping, to ``optimizer.step``, so a pre-hook would fire before the closure and see the previous
    step's gradients). Computed here, not by the module."""

    def __init__(self):
        self.pre, self.post, self._handle = [], [], None

    def on_train_start(self, trainer, pl_module):
        def hook(optimizer, args, kwargs):
            self.post.append(float(total_grad_norm(list(pl_module.parameters()))))
        self._handle = trainer.optimizers[0].register_step_post_hook(hook)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.pre.append(float(total_grad_norm(list(pl_module.parameters()))))

    def on_train_end(self, trainer, pl_module):
        self._handle.remove()


class _ClipInTrainingStep(NaNStudyModule):
    """The reported pattern: clip_grad_norm_ called in training_step, i.e. before backward."""

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        torch.nn.utils.clip_grad_norm_(self.parameters(), 1.0)  # gradients are None/zeroed here
        return loss


def test_nano_world_model_22_clipping_happens_after_backward_every_step(tmp_path):
    limit, steps = 1.0, 20
    cfg = reproduction_config("ishigami", "clip")
    assert cfg.training.gradient_clip_val == limit
    spy = _IndependentNorms()
    res = run_kfold(cfg, folds=[0], max_steps=steps, run_dir=tmp_path / "r", progress=False, callbacks=[spy])
    h = res.history
    assert len(spy.pre) == len(spy.post) == len(h) == steps
    post = np.array(spy.post)
    assert (post <= limit * (1 + 1e-6)).all(), post.max()  # what the optimizer used, every step
    assert (np.array(spy.pre) > limit).sum() >= steps // 2  # and clipping had work to do
    # the logged norm is this step's: equal to the independent pre-clip norm of the same step ...
    np.testing.assert_allclose(h["grad_norm_before_clip"], spy.pre, rtol=1e-6)
    np.testing.assert_allclose(h["grad_norm_after_clip"], spy.post, rtol=1e-6)
    # ... and to the CSV log row with the same step (no off-by-one between step and value)
    m = pd.read_csv(res.run_dir / "fold0" / "metrics.csv").dropna(subset=["grad_norm_before_clip"])
    assert m["step"].tolist() == list(range(steps))
    np.testing.assert_allclose(m["grad_norm_before_clip"], spy.pre, rtol=1e-6)

    # the reported pattern, same data and seed, no Trainer clipping: the optimizer sees unclipped norms
    data = load_dataset("ishigami")
    train_idx, val_idx = fold_indices(len(data), 5, 0)[0]
    pl.seed_everything(0, verbose=False)
    broken = _ClipInTrainingStep(reproduction_config("ishigami"), n_features=data.x.shape[-1])
    train_dl, val_dl = make_loaders(data, train_idx, val_idx, 32, seed=0)
    spy2 = _IndependentNorms()
    trainer = pl.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[spy2],
                         num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(broken, train_dl, val_dl)
    assert trainer.gradient_clip_val is None
    np.testing.assert_allclose(spy2.post, spy2.pre, rtol=1e-6)  # nothing between backward and step
    assert max(spy2.post) > 5 * limit


# --- Lightning-AI/pytorch-lightning#1476, #19534 ----------------------------------------------------


def _warmup_run(tmp_path, interval, steps):
    cfg = reproduction_config("ishigami", "clip").updated({
        "training.lr": 1e-2, "training.warmup": {"enabled": True, "start_factor": 0.1, "total_iters": 10,
                                                 "step_size": 1000, "gamma": 0.5, "interval": interval}})
    return run_kfold(cfg, folds=[0], max_steps=steps, run_dir=tmp_path / interval, progress=False).history


def test_lightning_1476_warmup_is_per_optimizer_step(tmp_path):
    base, start, n = 1e-2, 0.1, 10
    h = _warmup_run(tmp_path, "step", 15)
    k = h["step"].to_numpy()
    expected = base * (start + (1 - start) * np.minimum(k, n) / n)  # LinearLR, then StepLR at gamma**0
    np.testing.assert_allclose(h["lr"], expected, rtol=1e-6)
    assert h["lr"].iloc[0] == pytest.approx(1e-3) and h["lr"].iloc[10] == pytest.approx(1e-2)
    # the pitfall the reports describe: interval "epoch" steps the warmup once per epoch (25 steps here)
    h = _warmup_run(tmp_path, "epoch", 30)
    np.testing.assert_allclose(h["lr"].iloc[:25], base * start, rtol=1e-6)
    np.testing.assert_allclose(h["lr"].iloc[25:], base * (start + (1 - start) / n), rtol=1e-6)
