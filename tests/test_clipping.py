"""Adaptive clipping: AutoClip and ZClip thresholds checked against hand-computed values, their config
keys, and short real runs in which every post-clip norm stays under the threshold logged for its step."""
from __future__ import annotations

import math

import lightning.pytorch as pl
import numpy as np
import pytest

from prot_lib.callbacks import AdaptiveGradientClipping, AutoClip, ZClip
from prot_lib.training import ConfigError, reproduction_config, run_kfold, safety_nets


@pytest.fixture(autouse=True)
def _no_run_cache(monkeypatch):
    monkeypatch.delenv("PROT_LIB_CACHE", raising=False)


# --- AutoClip: the p-th percentile of every norm so far, the current one included -------------------


def test_autoclip_percentile_10_by_hand():
    # sorted histories and numpy's linear interpolation, rank = p/100 * (n - 1):
    # [4] -> 4; [1, 4] rank 0.1 -> 1 + 0.1*3 = 1.3; [1, 3, 4] rank 0.2 -> 1 + 0.2*2 = 1.4;
    # [1, 2, 3, 4] rank 0.3 -> 1 + 0.3*1 = 1.3
    clip = AutoClip(percentile=10)
    got = [clip.threshold(g) for g in (4.0, 1.0, 3.0, 2.0)]
    np.testing.assert_allclose(got, [4.0, 1.3, 1.4, 1.3], rtol=1e-12)


def test_autoclip_median_and_window_by_hand():
    clip = AutoClip(percentile=50)
    np.testing.assert_allclose([clip.threshold(g) for g in (4.0, 1.0, 3.0, 2.0)], [4.0, 2.5, 3.0, 2.5])
    window = AutoClip(percentile=50, history=2)  # keeps the last two norms only
    np.testing.assert_allclose([window.threshold(g) for g in (4.0, 1.0, 3.0, 2.0)], [4.0, 2.5, 2.0, 2.5])


def test_autoclip_first_step_never_clips_and_100_never_clips():
    assert AutoClip(10).threshold(7.5) == 7.5  # the only norm is its own percentile
    top = AutoClip(100)
    for g in (3.0, 1.0, 5.0, 2.0):
        assert top.threshold(g) >= g


def test_autoclip_nonfinite_norms_do_not_poison_the_history():
    clip = AutoClip(percentile=50)
    assert math.isnan(clip.threshold(float("nan")))  # nothing to take a percentile of yet
    clip.threshold(4.0)
    clip.threshold(2.0)
    assert clip.threshold(float("inf")) == 3.0  # unchanged: median of [2, 4]
    assert clip.threshold(float("nan")) == 3.0
    assert list(clip.norms) == [4.0, 2.0] and clip.n_skipped == 3
    assert clip.threshold(6.0) == 4.0  # still working


def test_autoclip_state_round_trip():
    a = AutoClip(25)
    for g in (5.0, 1.0, 2.0):
        a.threshold(g)
    b = AutoClip(25)
    b.load_state_dict(a.state_dict())
    assert b.threshold(3.0) == a.threshold(3.0)


@pytest.mark.parametrize("bad", [0.0, -1.0, 100.5])
def test_autoclip_rejects_bad_percentile(bad):
    with pytest.raises(ValueError, match="percentile"):
        AutoClip(bad)


# --- ZClip: EMA of mean and variance, z-score, reciprocal clipping, EMA of the clipped norm -----------


def _warm(mode="reciprocal"):
    """alpha 0.5, z_thresh 1, warmup 2 on norms [1, 3]: mu = 2, var = 1 (population), sigma = 1."""
    z = ZClip(alpha=0.5, z_thresh=1.0, warmup_steps=2, mode=mode)
    assert math.isnan(z.threshold(1.0)) and math.isnan(z.threshold(3.0))  # warmup: no clipping
    assert (z.mean, z.var) == (2.0, 1.0)
    return z


def test_zclip_by_hand_no_spike_then_spike():
    z = _warm()
    # g = 2.5: z = 0.5 <= 1, no clip; the value returned is the spike boundary mu + 1*sigma = 3
    assert z.threshold(2.5) == pytest.approx(3.0, abs=1e-5)
    # EMA with the unclipped norm: mu = .5*2 + .5*2.5 = 2.25; var = .5*1 + .5*(2.5 - 2.25)^2 = 0.53125
    assert z.mean == pytest.approx(2.25) and z.var == pytest.approx(0.53125)
    # g = 10: z = (10 - 2.25)/sqrt(0.53125) = 10.633 > 1; reciprocal: g* = mu + (1^2/z) sigma
    #        = mu + var/(g - mu) = 2.25 + 0.53125/7.75 = 2.3185484
    assert z.threshold(10.0) == pytest.approx(2.3185484, abs=1e-5)
    assert z.n_clipped == 1
    # the EMA sees the clipped norm: mu = .5*2.25 + .5*2.3185484 = 2.2842742,
    # var = .5*0.53125 + .5*(2.3185484 - 2.2842742)^2 = 0.2662124
    assert z.mean == pytest.approx(2.2842742, abs=1e-6)
    assert z.var == pytest.approx(0.2662124, abs=1e-6)


@pytest.mark.parametrize("mode, expected", [("max", 2.25 + math.sqrt(0.53125)), ("mean", 2.25)])
def test_zclip_other_adjustments_by_hand(mode, expected):
    z = _warm(mode)
    z.threshold(2.5)
    assert z.threshold(10.0) == pytest.approx(expected, abs=1e-5)


def test_zclip_zscore_is_an_alias_of_reciprocal():
    assert ZClip(mode="zscore").mode == "reciprocal"


def test_zclip_nonfinite_norms_do_not_poison_the_statistics():
    z = _warm()
    z.threshold(2.5)
    mean, var = z.mean, z.var
    assert z.threshold(float("nan")) == pytest.approx(mean + math.sqrt(var))  # the boundary, unchanged
    assert z.threshold(float("inf")) == pytest.approx(mean + math.sqrt(var))
    assert (z.mean, z.var) == (mean, var) and z.n_skipped == 2
    # the next spike is still clipped (the authors' code would have NaN statistics and never clip again)
    assert z.threshold(10.0) == pytest.approx(2.3185484, abs=1e-5)


def test_zclip_warmup_skips_nonfinite_norms():
    z = ZClip(alpha=0.5, z_thresh=1.0, warmup_steps=2)
    for g in (1.0, float("nan"), 3.0):
        assert math.isnan(z.threshold(g))
    assert (z.mean, z.var) == (2.0, 1.0)


@pytest.mark.parametrize("kwargs, word", [({"alpha": 1.0}, "alpha"), ({"z_thresh": 0.0}, "z_thresh"),
                                          ({"warmup_steps": 0}, "warmup_steps"), ({"mode": "median"}, "mode")])
def test_zclip_rejects_bad_arguments(kwargs, word):
    with pytest.raises(ValueError, match=word):
        ZClip(**kwargs)


# --- config keys ------------------------------------------------------------------------------------


def test_config_keys_and_defaults(tmp_path):
    cfg = reproduction_config("ishigami")
    t = cfg.training
    assert (t.autoclip_percentile, t.zclip_z_thresh, t.zclip_alpha, t.zclip_warmup_steps) == (10.0, 2.5, 0.97, 25)
    assert safety_nets(cfg, tmp_path).clipper is None and not t.adaptive_clip
    cfg = reproduction_config("ishigami", "clip").updated({"training.gradient_clip_algorithm": "zclip",
                                                            "training.zclip_z_thresh": 3.0})
    nets = safety_nets(cfg, tmp_path)
    c = nets.clipper
    assert isinstance(c, AdaptiveGradientClipping) and isinstance(c.clipper, ZClip) and c.clipper.z_thresh == 3.0
    assert cfg.training.adaptive_clip and nets.trainer_kwargs["gradient_clip_val"] is None  # not Lightning's
    cfg = reproduction_config("ishigami").updated({"training.gradient_clip_algorithm": "autoclip",
                                                   "training.autoclip_percentile": 25})
    c = safety_nets(cfg, tmp_path).clipper
    assert isinstance(c.clipper, AutoClip) and c.clipper.percentile == 25.0


@pytest.mark.parametrize("key, value", [("training.gradient_clip_algorithm", "adaptive"),
                                        ("training.autoclip_percentile", 0), ("training.zclip_alpha", 1.0)])
def test_config_rejects_bad_values(key, value):
    with pytest.raises(ConfigError, match=key):
        reproduction_config("ishigami").updated({key: value})


# --- short real runs --------------------------------------------------------------------------------


class _TrainerClipArgs(pl.Callback):
    def on_fit_start(self, trainer, pl_module):
        self.val, self.algo = trainer.gradient_clip_val, trainer.gradient_clip_algorithm


@pytest.mark.parametrize("algo", ["autoclip", "zclip"])
def test_adaptive_clipping_bounds_every_post_clip_norm(tmp_path, algo):
    # gradient_clip_val 1.0 is set on purpose: the adaptive algorithms ignore it, the Trainer never sees it
    # on the Vim-style residual stack (topology "layers"), which stays finite for these 30 steps
    cfg = reproduction_config("ishigami", "clip").updated({
        "training.gradient_clip_algorithm": algo, "training.zclip_warmup_steps": 5,
        "model.topology": "layers", "model.residual": True})
    spy = _TrainerClipArgs()
    res = run_kfold(cfg, folds=[0], max_steps=30, run_dir=tmp_path / "runs", progress=False, callbacks=[spy])
    assert spy.val is None  # Lightning's own clipping is off; the module clips
    h = res.history
    assert len(h) == 30 and res.nan_folds == []
    thr, before, after = (h[c].to_numpy(float) for c in ("clip_threshold", "grad_norm_before_clip",
                                                         "grad_norm_after_clip"))
    bounded = np.isfinite(thr)
    assert bounded.sum() == (30 if algo == "autoclip" else 25)  # ZClip: 5 warmup steps without threshold
    assert (after[bounded] <= thr[bounded] * (1 + 1e-6)).all()
    clipped = before[bounded] > thr[bounded]
    assert clipped.any()  # it acted: the raw norm exceeded the threshold at some step and was scaled to it
    np.testing.assert_allclose(after[bounded][clipped], thr[bounded][clipped], rtol=1e-5)
    np.testing.assert_allclose(after[~bounded], before[~bounded], rtol=1e-6)
    if algo == "autoclip":  # the logged threshold is the 10th percentile of this fold's norms so far
        expected = [np.percentile(before[: k + 1], 10) for k in range(30)]
        np.testing.assert_allclose(thr, expected, rtol=1e-6)
        assert clipped.mean() > 0.5  # p = 10 clips most steps, by design
    metrics = (tmp_path / "runs" / "fold0" / "metrics.csv").read_text()
    assert "clip_threshold" in metrics.splitlines()[0]


def test_fixed_norm_clipping_logs_its_value_as_threshold(tmp_path):
    res = run_kfold(reproduction_config("ishigami", "clip"), folds=[0], max_steps=3,
                    run_dir=tmp_path / "runs", progress=False)
    assert (res.history["clip_threshold"] == 1.0).all()
    res = run_kfold(reproduction_config("ishigami"), folds=[0], max_steps=3,
                    run_dir=tmp_path / "runs2", progress=False)
    assert res.history["clip_threshold"].isna().all()
