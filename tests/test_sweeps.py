"""prot_lib.training.sweeps: the fix matrix, the stability map and the recommended config (chapter 8).

The trainings here are a few optimizer steps of one or two folds (seconds); the run cache is off, so
every run trains for real.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import yaml

from prot_lib.training import reproduction_config, run_kfold
from prot_lib.training.sweeps import (FIX_FOLD_COLUMNS, FIX_TABLE_COLUMNS, MAP_COLUMNS, RECOMMENDED,
                                      describe_stability, fix_matrix, recommended_config, recommended_yaml,
                                      same_run, stability_edge, stability_map, stability_pivot, subset_result,
                                      target_std)


@pytest.fixture(autouse=True)
def _no_run_cache(monkeypatch):
    monkeypatch.delenv("PROT_LIB_CACHE", raising=False)


def test_subset_of_a_two_fold_run_is_the_one_fold_run(tmp_path):
    cfg = reproduction_config("ishigami")
    both = run_kfold(cfg, folds=[0, 1], max_steps=4, run_dir=tmp_path / "a", progress=False)
    one = run_kfold(cfg, folds=[1], max_steps=4, run_dir=tmp_path / "b", progress=False)
    sub = subset_result(both, [1])
    assert sub.summary["fold"].tolist() == [1] and len(sub.models) == 1
    cols = ["step", "raw_loss", "grad_norm_before_clip"]
    # folds re-seed with seed + fold: fold 1 inside a 2-fold run is fold 1 alone, bit for bit
    pd.testing.assert_frame_equal(sub.history[cols].reset_index(drop=True), one.history[cols].reset_index(drop=True))
    with pytest.raises(KeyError, match=r"\[3\]"):
        subset_result(both, [3])


def test_same_run_ignores_only_the_name():
    # Dyconex's shipped lr already is the write-up's 1e-4: fix lower-lr changes nothing there
    assert same_run(reproduction_config("dyconex", "lower-lr"), reproduction_config("dyconex"))
    assert not same_run(reproduction_config("ishigami", "lower-lr"), reproduction_config("ishigami"))
    assert not same_run(reproduction_config("dyconex", "dict-clip"), reproduction_config("dyconex"))


def test_fix_matrix_counts_dead_folds_and_reuses_identical_configs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # run_kfold's default run_dir is relative
    m = fix_matrix({"dyconex": [0]}, fixes=("none", "lower-lr", "sanitize", "normalize"), max_steps=15)
    assert list(m.table.columns) == FIX_TABLE_COLUMNS and list(m.per_fold.columns) == FIX_FOLD_COLUMNS
    none, lower, san, norm = (m.row("dyconex", f) for f in ("none", "lower-lr", "sanitize", "normalize"))
    # (15 steps: one epoch, so one validation) raw Dyconex: NaN input -> NaN loss at the first step, dead weights, no live fold for an RMSE
    assert none["folds_nonfinite_loss"] == 1 and none["folds_nan_params_end"] == 1
    assert none["first_nonfinite_step"] == 0 and none["n_live_folds"] == 0 and math.isnan(none["mean_val_rmse"])
    assert lower["same_config_as"] == "none" and m.runs[("dyconex", "lower-lr")] is m.runs[("dyconex", "none")]
    # sanitisation: the logged loss is finite, the weights are not
    assert san["folds_nonfinite_logged_loss"] == 0 and san["folds_nan_params_end"] == 1
    assert norm["folds_nan_params_end"] == 0 and norm["n_live_folds"] == 1
    assert norm["target_std"] == pytest.approx(target_std("dyconex")) and norm["rmse_over_std"] > 0
    p = m.pivot("frac_nan_params_end")
    assert p.index.tolist() == ["none", "lower-lr", "sanitize", "normalize"] and p.columns.tolist() == ["dyconex"]
    assert p.loc["normalize", "dyconex"] == 0.0 and p.loc["none", "dyconex"] == 1.0


def test_fix_matrix_slices_known_runs(tmp_path):
    cfg = reproduction_config("dyconex")
    known = run_kfold(cfg, folds=[0, 1], max_steps=2, run_dir=tmp_path, progress=False)
    m = fix_matrix({"dyconex": [1]}, fixes=("none",), known={("dyconex", "none"): known}, max_steps=2)
    assert m.per_fold["fold"].tolist() == [1] and m.row("dyconex", "none")["n_folds"] == 1


def _map_frame(cells):
    rows = [{"dataset": "d", "fix": "none", "lr": lr, "setting": s, "fold": f, "n_steps": 10, "nonfinite": bad,
             "first_nan_step": 3 if bad else math.nan, "final_loss": 1.0, "max_grad_norm": 1.0,
             "final_val_rmse": math.nan if bad else 1.0}
            for (lr, s), fates in cells.items() for f, bad in enumerate(fates)]
    return pd.DataFrame(rows, columns=MAP_COLUMNS)


def test_stability_pivot_edge_and_description():
    df = _map_frame({(1e-3, "off"): [False, False], (1e-2, "off"): [False, True], (5e-2, "off"): [True, True],
                     (1e-3, "clip 1"): [False, False], (1e-2, "clip 1"): [False, False], (5e-2, "clip 1"): [True, True]})
    p = stability_pivot(df)
    assert p.index.tolist() == [1e-3, 1e-2, 5e-2] and p.columns.tolist() == ["off", "clip 1"]
    assert p.loc[1e-2, "off"] == 0.5 and p.loc[1e-2, "clip 1"] == 0.0
    edge = stability_edge(p)
    assert edge["off"] == 1e-3 and edge["clip 1"] == 1e-2
    text = describe_stability(p, "d")
    assert "finite up to lr 0.001 without clipping" in text and "clip 1 moves it to lr 0.01" in text
    assert "every setting fails at lr 0.05" in text
    dead = stability_pivot(_map_frame({(1e-3, "off"): [True], (1e-3, "clip 1"): [True]}))
    assert stability_edge(dead).isna().all() and "no clip setting moves it" in describe_stability(dead, "d")
    worse = stability_pivot(_map_frame({(1e-3, "off"): [False], (1e-2, "off"): [False],
                                        (1e-3, "clip 1"): [False], (1e-2, "clip 1"): [True]}))
    assert "every clip setting lowers it (best: clip 1, lr 0.001)" in describe_stability(worse, "d")
    calm = stability_pivot(_map_frame({(1e-3, "off"): [False], (1e-3, "clip 1"): [False]}))
    assert describe_stability(calm, "d") == "d: every cell stays finite"


def test_stability_map_runs_each_cell(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    df = stability_map("ishigami", lrs=[1e-3], clips=(None, 1.0), algorithms=("autoclip",), max_steps=3)
    assert list(df.columns) == MAP_COLUMNS
    assert df["setting"].tolist() == ["off", "clip 1", "autoclip"] and (df["n_steps"] == 3).all()
    assert not df["nonfinite"].any() and np.isfinite(df["final_loss"]).all()


def test_recommended_config_sets_every_key():
    for dataset in ("ishigami", "dyconex"):
        cfg = recommended_config(dataset)
        assert cfg.name == f"{dataset}_recommended"
        t = cfg.training
        assert cfg.data.normalize and cfg.model.norm == "layernorm" and t.mask_missing_targets
        assert t.gradient_clip_val == 1.0 and t.clip_via == "trainer" and t.sanitize == "off"
        assert t.on_nonfinite == "stop" and t.data_guard and t.warmup.enabled and t.warmup.interval == "step"
        loaded = yaml.safe_load(recommended_yaml(dataset))
        assert loaded["model"]["norm"] == "layernorm" and loaded["training"]["warmup"]["interval"] == "step"
    assert recommended_config("ishigami", {"training.lr": 1e-3}).training.lr == 1e-3
    assert all("." in k for k in RECOMMENDED)  # dotted paths, validated by RunConfig.updated above
