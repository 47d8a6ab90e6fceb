"""The training behaviour chapters 4-8 rely on, measured on short real runs.

Each test trains one fold for a few dozen optimizer steps (``max_steps``) and asserts numbers a reader
can check in the run's own history or CSV log: post-clip norms, the learning rate the optimizer used,
metric names in ``metrics.csv``, and bit-identical reruns. Runs are never read from the run cache
(``PROT_LIB_CACHE`` is unset here), so every test trains for real.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from prot_lib.training import reproduction_config, run_kfold
from prot_lib.training.module import SANITIZE_LOSS_FILL

CLIP = 1.0


@pytest.fixture(autouse=True)
def _no_run_cache(monkeypatch):
    monkeypatch.delenv("PROT_LIB_CACHE", raising=False)


def _run(cfg, tmp_path, max_steps=-1, folds=(0,)):
    return run_kfold(cfg, folds=list(folds), max_steps=max_steps, run_dir=tmp_path / "runs", progress=False)


# --- gradient clipping -----------------------------------------------------------------------------


def test_trainer_clipping_bounds_the_post_clip_norm(tmp_path):
    cfg = reproduction_config("ishigami", "clip")
    assert cfg.training.gradient_clip_val == CLIP
    h = _run(cfg, tmp_path, max_steps=30).history
    assert len(h) == 30
    before, after = h["grad_norm_before_clip"].to_numpy(), h["grad_norm_after_clip"].to_numpy()
    finite = np.isfinite(after)
    assert finite.all(), h.loc[~finite, "step"].tolist()
    assert (after[finite] <= CLIP + 1e-6).all(), after.max()
    # clipping really acted: the raw norm exceeded the clip value at some step, and was scaled to it
    active = before > CLIP
    assert active.any(), before.max()
    np.testing.assert_allclose(after[active], CLIP, rtol=1e-5)
    # below the threshold clip_grad_norm_ leaves gradients alone
    np.testing.assert_allclose(after[~active], before[~active], rtol=1e-6)


def test_dict_clipping_is_ignored_and_warns(tmp_path):
    cfg = reproduction_config("ishigami", "dict-clip")
    assert cfg.training.clip_via == "configure_optimizers"
    res = _run(cfg, tmp_path, max_steps=20)
    h = res.history
    assert (h["grad_norm_before_clip"] > CLIP).any(), "test needs a step whose norm exceeds the clip value"
    # nothing was clipped: the norm after the clipping hook is the norm before it, bit for bit
    pd.testing.assert_series_equal(h["grad_norm_after_clip"], h["grad_norm_before_clip"], check_names=False)
    assert any("unsupported keys" in w for w in res.warnings), res.warnings


# --- warmup: LinearLR -> StepLR via SequentialLR ---------------------------------------------------


def test_warmup_per_step_starts_at_start_factor_and_reaches_lr(tmp_path):
    cfg = reproduction_config("ishigami", "warmup")
    w, lr = cfg.training.warmup, cfg.training.lr
    assert w.enabled and w.interval == "step"
    h = _run(cfg, tmp_path, max_steps=w.total_iters + 5).history.set_index("step")
    assert h.loc[0, "lr"] == pytest.approx(w.start_factor * lr, rel=1e-9)
    assert h.loc[w.total_iters, "lr"] == pytest.approx(lr, rel=1e-9)
    ramp = h.loc[: w.total_iters, "lr"].to_numpy()
    assert (np.diff(ramp) > 0).all(), "the lr must rise at every step of the warmup"
    # linear: equal increments of (1 - start_factor) * lr / total_iters
    np.testing.assert_allclose(np.diff(ramp), (1 - w.start_factor) * lr / w.total_iters, rtol=1e-6)


def test_warmup_per_epoch_is_constant_within_an_epoch(tmp_path):
    cfg = reproduction_config("ishigami", "warmup").updated(
        {"training.warmup.interval": "epoch", "training.max_epochs": 3})
    w, lr = cfg.training.warmup, cfg.training.lr
    h = _run(cfg, tmp_path).history
    per_epoch = h.groupby("epoch")["lr"]
    assert (per_epoch.nunique() == 1).all(), per_epoch.unique()
    lrs = per_epoch.first()
    assert lrs.loc[0] == pytest.approx(w.start_factor * lr, rel=1e-9)
    # one LinearLR step per epoch: after 2 epochs the lr is still far below its target
    assert lrs.loc[2] == pytest.approx(lr * (w.start_factor + 2 * (1 - w.start_factor) / w.total_iters), rel=1e-9)
    assert lrs.loc[2] < 0.2 * lr


# --- the write-up's NaN detection and monitoring ---------------------------------------------------

WRITEUP_METRICS = [f"{stage}_{m}" for stage in ("train", "val")
                   for m in ("nan_detected", "loss_nan_detected", "final_loss_nan")] + ["invalid_gradients_detected"]


def test_sanitize_logs_the_writeup_metrics(tmp_path):
    cfg = reproduction_config("dyconex", "sanitize").updated({"training.max_epochs": 1})
    res = _run(cfg, tmp_path)
    metrics = pd.read_csv(res.run_dir / "fold0" / "metrics.csv")
    missing = [m for m in WRITEUP_METRICS if m not in metrics.columns]
    assert not missing, missing
    # on raw Dyconex the checks fire: a NaN prediction and a non-finite gradient are both reported
    assert metrics["train_nan_detected"].max() == 1.0
    assert metrics["invalid_gradients_detected"].max() == 1.0
    # grad_norm_<param> is written only for a parameter whose gradient is non-finite, on a step that
    # reported invalid gradients; read as text, a cell that was never logged is "" and a logged NaN "nan"
    raw = pd.read_csv(res.run_dir / "fold0" / "metrics.csv", keep_default_na=False, dtype=str)
    per_param = [c for c in raw.columns if c.startswith("grad_norm_model.")]
    assert per_param
    logged = raw[per_param] != ""
    assert logged.to_numpy().any()
    values = raw[per_param].where(logged).stack().astype(float)
    assert not np.isfinite(values).any(), values[np.isfinite(values)]
    rows = logged.any(axis=1)
    assert (raw.loc[rows, "invalid_gradients_detected"].astype(float) == 1.0).all()


def test_monitoring_is_silent_when_gradients_are_finite(tmp_path):
    cfg = reproduction_config("ishigami", "clip").updated({"training.monitor_gradients": True})
    res = _run(cfg, tmp_path, max_steps=10)
    metrics = pd.read_csv(res.run_dir / "fold0" / "metrics.csv")
    assert (metrics["invalid_gradients_detected"].dropna() == 0).all()
    assert not [c for c in metrics.columns if c.startswith("grad_norm_model.")]


def test_writeup_monitoring_sees_pre_clip_norms(tmp_path):
    """on_before_optimizer_step runs before Lightning clips: the per-parameter norms of
    ``log_param_grad_norms`` are pre-clip, and say so; the post-clip ones recombine to <= the clip value."""
    cfg = reproduction_config("ishigami", "clip").updated(
        {"training.monitor_gradients": True, "training.log_param_grad_norms": True})
    res = _run(cfg, tmp_path, max_steps=20)
    h = res.history.set_index("step")
    pgn = res.param_grad_norms
    assert list(pgn.columns) == ["fold", "step", "param", "grad_norm_before_clip", "grad_norm_after_clip"]
    total = pgn[pgn["param"] == "total"].set_index("step")
    assert len(total) == len(h) == 20
    np.testing.assert_allclose(total["grad_norm_before_clip"], h["grad_norm_before_clip"], rtol=1e-12)
    clipped = h["grad_norm_before_clip"] > CLIP
    assert clipped.any()
    # per-parameter norms recombine to the totals, before and after clipping
    per = pgn[pgn["param"] != "total"].groupby("step")[["grad_norm_before_clip", "grad_norm_after_clip"]].apply(
        lambda v: np.sqrt((v.astype(float) ** 2).sum()))
    # per-parameter norms are float64, the total a float32 reduction (relative error ~1e-6 over 27k elements)
    np.testing.assert_allclose(per["grad_norm_before_clip"], h["grad_norm_before_clip"], rtol=1e-5)
    np.testing.assert_allclose(per["grad_norm_after_clip"], h["grad_norm_after_clip"], rtol=1e-5)
    assert (per.loc[clipped[clipped].index, "grad_norm_after_clip"] <= CLIP * (1 + 1e-5)).all()
    # the same numbers are logged, under names that say pre or post clip
    metrics = pd.read_csv(res.run_dir / "fold0" / "metrics.csv")
    name = "model.head.weight"
    logged = metrics.dropna(subset=[f"grad_norm_before_clip/{name}"]).set_index("step")
    rows = pgn[pgn["param"] == name].set_index("step")
    np.testing.assert_allclose(logged[f"grad_norm_before_clip/{name}"], rows["grad_norm_before_clip"], rtol=1e-6)
    np.testing.assert_allclose(logged[f"grad_norm_after_clip/{name}"], rows["grad_norm_after_clip"], rtol=1e-6)


# --- raw loss under sanitisation ------------------------------------------------------------------


def test_sanitize_raw_loss_is_the_true_raw_loss(tmp_path):
    """Under sanitize: writeup, raw_loss is computed before the NaN -> 0 replacement and the clamp: NaN
    predictions show in it, while the logged train_loss stays the sanitised (finite) one."""
    cfg = reproduction_config("dyconex", "sanitize").updated({"training.max_epochs": 1})
    h = _run(cfg, tmp_path, max_steps=6).history
    assert h["raw_loss"].isna().all()  # raw Dyconex inputs hold NaN: every batch has a NaN prediction
    assert np.isfinite(h["train_loss"]).all() and not h["loss_finite"].any()
    # including batches without a missing target (no 1e6 penalty in train_loss), where the old raw_loss,
    # taken after the replacement, was finite
    no_missing_target = h["train_loss"] < SANITIZE_LOSS_FILL / cfg.training.batch_size
    assert no_missing_target.any()
    # without NaN in the predictions the two agree: Ishigami, whose predictions are finite at first
    ish = _run(reproduction_config("ishigami", "sanitize"), tmp_path / "ish", max_steps=5).history
    np.testing.assert_array_equal(ish["raw_loss"], ish["train_loss"])


# --- determinism ---------------------------------------------------------------------------------

LOSS_COLUMNS = ["fold", "epoch", "step", "lr", "raw_loss", "train_loss", "grad_norm_before_clip", "grad_norm_after_clip"]


def test_same_config_twice_gives_identical_history(tmp_path):
    cfg = reproduction_config("ishigami", "none")
    a = _run(cfg, tmp_path / "a", max_steps=25).history
    b = _run(cfg, tmp_path / "b", max_steps=25).history
    pd.testing.assert_frame_equal(a[LOSS_COLUMNS], b[LOSS_COLUMNS])


def test_same_config_twice_gives_identical_first_nan_steps_on_dyconex(tmp_path):
    cfg = reproduction_config("dyconex", "none")
    a = _run(cfg, tmp_path / "a", max_steps=5, folds=(0, 1))
    b = _run(cfg, tmp_path / "b", max_steps=5, folds=(0, 1))
    assert a.nan_folds == b.nan_folds == [0, 1]
    cols = ["fold", "first_nonfinite_loss_step", "first_nonfinite_grad_step", "first_nonfinite_param_step"]
    pd.testing.assert_frame_equal(a.summary[cols], b.summary[cols])
    pd.testing.assert_frame_equal(a.history[LOSS_COLUMNS], b.history[LOSS_COLUMNS])


# --- weight decay: mamba-ssm's recipe ------------------------------------------------------------


def test_weight_decay_groups_follow_the_mamba_recipe():
    """No decay on biases (dt_proj.bias included), normalisation weights, A_log and D; decay on the rest."""
    from prot_lib.training import NaNStudyModule, config_from_dict

    cfg = config_from_dict({"model": {"topology": "layers", "n_layers": 2, "norm": "layernorm"}, "training": {"weight_decay": 0.1}})
    module = NaNStudyModule(cfg, n_features=4)
    opt = module.configure_optimizers()["optimizer"]
    decay, exempt = opt.param_groups
    assert (decay["weight_decay"], exempt["weight_decay"]) == (0.1, 0.0)
    layer0 = sorted(n.split("layers.0.")[1] for n in decay["names"] if "layers.0." in n)
    assert layer0 == [f"{d}.{w}.weight" for d in ("bwd", "fwd") for w in ("conv1d", "dt_proj", "in_proj", "out_proj", "x_proj")]
    assert [n for n in decay["names"] if "bimamba" not in n] == ["model.embedding.weight", "model.head.weight"]
    for name in ("fwd.dt_proj.bias", "fwd.A_log", "fwd.D", "bwd.conv1d.bias", "norm.weight", "norm.bias"):
        assert f"model.bimamba.layers.1.{name}" in exempt["names"], name
    assert "model.embedding.bias" in exempt["names"] and "model.head.bias" in exempt["names"]
    # every parameter in exactly one group, groups and names aligned
    named = dict(module.named_parameters())
    assert sorted(decay["names"] + exempt["names"]) == sorted(named)
    for g in (decay, exempt):
        assert all(named[n] is p for n, p in zip(g["names"], g["params"]))
    # only 2-D-or-more weights are decayed here: every exempt tensor is a bias, a norm weight, A_log or D
    assert all(named[n].dim() >= 2 for n in decay["names"])


def test_weight_decay_groups_on_the_writeups_stacks():
    """The same recipe on the write-up's topology with its post-norm: norm weights, biases, A_log, D exempt."""
    from prot_lib.training import NaNStudyModule, config_from_dict

    cfg = config_from_dict({"model": {"topology": "stacks", "n_layers": 2, "norm": "layernorm"},
                            "training": {"weight_decay": 0.1}})
    module = NaNStudyModule(cfg, n_features=4)
    decay, exempt = module.configure_optimizers()["optimizer"].param_groups
    for stack in ("forward", "backward"):
        block0 = sorted(n.split(f"{stack}_layers.0.")[1] for n in decay["names"] if f"{stack}_layers.0." in n)
        assert block0 == [f"{w}.weight" for w in ("conv1d", "dt_proj", "in_proj", "out_proj", "x_proj")]
        for name in (f"{stack}_layers.1.dt_proj.bias", f"{stack}_layers.1.A_log", f"{stack}_layers.1.D",
                     f"{stack}_norms.1.weight", f"{stack}_norms.1.bias"):
            assert f"model.bimamba.{name}" in exempt["names"], name
    assert sorted(decay["names"] + exempt["names"]) == sorted(n for n, _ in module.named_parameters())
