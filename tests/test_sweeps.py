"""prot_lib.experiments: cells and clip settings, the fix matrix, the stability map and clip sweep, the seed
rates, the sweep specs and the recommended config.

The trainings here are a few optimizer steps of one or two folds, in this process (``n_jobs=1``); the run
cache is off, so every run trains for real. The engine itself (workers, Dask, resume) is tested in
``test_engine.py``.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import yaml

from prot_lib.experiments import (CLIP_SETTINGS, FIX_TABLE_COLUMNS, ROW_COLUMNS, clip_settings, clip_sweep,
                                  clip_sweep_table, describe_stability, edge_table, fix_matrix, grid_cells,
                                  load_spec, needs_tuning_table, recommended_config, recommended_yaml, seed_rates,
                                  setting_label, setting_overrides, spec_cells, stability_edge, stability_map,
                                  stability_pivot, subset_result, summarize_clip_map, sweep_names)
from prot_lib.experiments.cells import cell_config
from prot_lib.training import FIXES, ConfigError, reproduction_config, run_kfold
from prot_lib.training.fate import FATE_COLUMNS

ONE_CORE = {"n_jobs": 1, "progress": False}


@pytest.fixture(autouse=True)
def _no_run_cache(monkeypatch):
    monkeypatch.delenv("PROT_LIB_CACHE", raising=False)


# ------------------------------------------------------------------------------------ cells, settings
def test_clip_setting_labels_round_trip_through_the_config():
    base = reproduction_config("ishigami")
    for label in CLIP_SETTINGS + ("value 0.5", "autoclip p5"):
        cfg = base.updated(setting_overrides(label))
        assert setting_label(cfg.training) == label, label
    assert setting_label(reproduction_config("ishigami", "dict-clip").training) == "dict-key 1"
    assert setting_label(reproduction_config("ishigami", "clip").training) == "norm 1"
    assert cell_config(base, setting="autoclip").training.autoclip_percentile == 10.0  # the paper's p
    assert clip_settings([None, 0.1, 1.0], ["autoclip", "zclip"]) == ["none", "norm 0.1", "norm 1", "autoclip p10",
                                                                      "zclip"]
    with pytest.raises(ConfigError, match="unknown clip setting 'clip 1'"):
        setting_overrides("clip 1")


def test_cell_config_extends_epochs_only_when_asked():
    dy = reproduction_config("dyconex")  # 3 epochs of 15 steps
    assert cell_config(dy, max_steps=100).training.max_epochs == 3
    assert cell_config(dy, max_steps=100, extend_epochs=True).training.max_epochs == 8  # ceil(100 / 15) + 1
    assert cell_config(dy, max_steps=30, extend_epochs=True).training.max_epochs == 3  # never lowered


def test_grid_cells_cross_the_axes_and_key_identical_runs_alike():
    cells = grid_cells({"dyconex": {"folds": [0, 1]}}, fixes=["none", "lower-lr", "clip"], seeds=[0, 1],
                       max_steps=5)
    assert [(c.labels["fix"], c.config.training.seed) for c in cells] == [
        ("none", 0), ("none", 1), ("lower-lr", 0), ("lower-lr", 1), ("clip", 0), ("clip", 1)]
    keys = [c.key for c in cells]
    assert keys[0] == keys[2] and keys[1] == keys[3]  # Dyconex's lr already is lower-lr's 1e-4
    assert len(set(keys)) == 4 and all(c.folds == (0, 1) for c in cells)
    split = grid_cells("ishigami", folds=[2, 3], split_folds=True)
    assert [c.folds for c in split] == [(2,), (3,)] and split[0].labels == {"dataset": "ishigami", "fix": "none"}


# ------------------------------------------------------------------------------------------ fix matrix
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


def test_fix_matrix_reads_the_fates_and_trains_identical_configs_once(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    m = fix_matrix({"dyconex": [0]}, fixes=("none", "lower-lr", "sanitize", "normalize"), max_steps=15, **ONE_CORE)
    assert list(m.table.columns) == FIX_TABLE_COLUMNS and set(ROW_COLUMNS) <= set(m.per_fold.columns)
    none, lower, san, norm = (m.row("dyconex", f) for f in ("none", "lower-lr", "sanitize", "normalize"))
    # (15 steps: one epoch, so one validation) raw Dyconex: NaN input -> NaN loss at the first step, dead weights
    assert none["folds_nonfinite_loss"] == 1 and none["folds_nan_params_end"] == 1 and none["folds_dead"] == 1
    assert none["first_nonfinite_step"] == 0 and none["n_live_folds"] == 0 and math.isnan(none["median_val_rmse"])
    f = m.per_fold.set_index("fix")
    assert lower["same_config_as"] == "none" and f.loc["lower-lr", "cell"] == f.loc["none", "cell"]
    assert f.loc["none", "fate"] == "dead" and f.loc["normalize", "fate"] in ("finite", "blown_up")
    # sanitisation: the logged loss is finite, the weights are not
    assert san["folds_nonfinite_logged_loss"] == 0 and san["folds_nan_params_end"] == 1
    assert norm["folds_nan_params_end"] == 0 and norm["n_live_folds"] == 1
    # the table's ratio is the fold's fate's rmse_ratio, not a second computation
    assert norm["rmse_over_std"] == pytest.approx(f.loc["normalize", "rmse_ratio"])
    assert norm["target_std"] == pytest.approx(f.loc["normalize", "target_std"])
    assert norm["n_blown_up"] == int(f.loc["normalize", "fate"] == "blown_up") and none["n_blown_up"] == 0
    # the runs behind the rows, fetched on demand (here trained again: no run cache in this test)
    assert m.runs[("dyconex", "lower-lr")] is m.runs[("dyconex", "none")] and len(m.runs) == 4
    assert m.runs[("dyconex", "sanitize")].fold_summary(0)["fate"] == f.loc["sanitize", "fate"]
    assert np.isfinite(m.runs[("dyconex", "sanitize")].history["train_loss"]).all()
    p = m.pivot("frac_nan_params_end")
    assert p.index.tolist() == ["none", "lower-lr", "sanitize", "normalize"] and p.columns.tolist() == ["dyconex"]
    assert p.loc["normalize", "dyconex"] == 0.0 and p.loc["none", "dyconex"] == 1.0


def test_fix_matrix_slices_known_runs(tmp_path):
    cfg = reproduction_config("dyconex")
    known = run_kfold(cfg, folds=[0, 1], max_steps=2, run_dir=tmp_path, progress=False)
    m = fix_matrix({"dyconex": [1]}, fixes=("none",), known={("dyconex", "none"): known}, max_steps=2, **ONE_CORE)
    assert m.per_fold["fold"].tolist() == [1] and m.row("dyconex", "none")["n_folds"] == 1
    assert m.per_fold["worker"].tolist() == ["known"]  # read from the run, not trained
    assert m.per_fold["first_nonfinite_step"].tolist() == [known.fold_summary(1)["first_nonfinite_step"]]


# ------------------------------------------------------------------------- stability map, clip sweep
def _rows(cells):
    """Hand-made sweep rows: {(lr, setting): [nonfinite per fold]} (a non-finite fold has no RMSE)."""
    rows = [dict.fromkeys(ROW_COLUMNS, math.nan) | {
        "dataset": "d", "fix": "none", "lr": lr, "setting": s, "fold": f, "nonfinite": bad,
        "first_nonfinite_step": 3 if bad else None, "final_val_rmse": math.nan if bad else 1.0}
        for (lr, s), fates in cells.items() for f, bad in enumerate(fates)]
    return pd.DataFrame(rows, columns=ROW_COLUMNS)


def test_stability_pivot_edge_and_description():
    df = _rows({(1e-3, "none"): [False, False], (1e-2, "none"): [False, True], (5e-2, "none"): [True, True],
                (1e-3, "norm 1"): [False, False], (1e-2, "norm 1"): [False, False], (5e-2, "norm 1"): [True, True]})
    p = stability_pivot(df)
    assert p.index.tolist() == [1e-3, 1e-2, 5e-2] and p.columns.tolist() == ["none", "norm 1"]
    assert p.loc[1e-2, "none"] == 0.5 and p.loc[1e-2, "norm 1"] == 0.0
    edge = stability_edge(p)
    assert edge["none"] == 1e-3 and edge["norm 1"] == 1e-2
    text = describe_stability(p, "d")
    assert "finite up to lr 0.001 without clipping" in text and "norm 1 moves it to lr 0.01" in text
    assert "every setting fails at lr 0.05" in text
    dead = stability_pivot(_rows({(1e-3, "none"): [True], (1e-3, "norm 1"): [True]}))
    assert stability_edge(dead).isna().all() and "no clip setting moves it" in describe_stability(dead, "d")
    worse = stability_pivot(_rows({(1e-3, "none"): [False], (1e-2, "none"): [False],
                                   (1e-3, "norm 1"): [False], (1e-2, "norm 1"): [True]}))
    assert "every clip setting lowers it (best: norm 1, lr 0.001)" in describe_stability(worse, "d")
    calm = stability_pivot(_rows({(1e-3, "none"): [False], (1e-3, "norm 1"): [False]}))
    assert describe_stability(calm, "d") == "d: every cell stays finite"


def test_clip_map_summaries_by_hand():
    rows = []
    for lr, setting, fold, nonfinite, rmse in [
        (0.01, "none", 0, False, 2.0), (0.01, "none", 1, False, 4.0),        # stable row: none finite
        (0.01, "norm 1", 0, False, 1.0), (0.01, "norm 1", 1, False, 2.0),    # best of the row: mean 1.5
        (0.01, "autoclip p10", 0, False, 1.5), (0.01, "autoclip p10", 1, False, 1.8),
        (0.03, "none", 0, True, math.nan), (0.03, "none", 1, False, 3.0),    # edge row: none lost a fold
        (0.03, "norm 1", 0, False, 2.0), (0.03, "norm 1", 1, False, 2.0),
        (0.03, "autoclip p10", 0, True, math.nan), (0.03, "autoclip p10", 1, True, math.nan),
        (0.1, "none", 0, True, math.nan), (0.1, "norm 1", 0, True, math.nan),  # dead row
        (0.1, "autoclip p10", 0, True, math.nan),
    ]:
        rows.append(dict.fromkeys(ROW_COLUMNS, math.nan) | {"dataset": "d", "lr": lr, "setting": setting,
                                                             "fold": fold, "nonfinite": nonfinite,
                                                             "final_val_rmse": rmse})
    df = pd.DataFrame(rows, columns=ROW_COLUMNS)
    s = summarize_clip_map(df).set_index(["lr", "setting"])
    # means 3.0, 1.5, 1.65 -> ratios 2.0, 1.0, 1.1; a lost fold counts as inf; a dead row has no ratio
    assert s.loc[(0.01, "none"), "rmse_ratio"] == pytest.approx(2.0)
    assert s.loc[(0.01, "autoclip p10"), "rmse_ratio"] == pytest.approx(1.1)
    assert s.loc[(0.03, "none"), "finite_rate"] == 0.5 and s.loc[(0.03, "none"), "rmse_ratio"] == math.inf
    assert math.isnan(s.loc[(0.1, "norm 1"), "rmse_ratio"])
    t = needs_tuning_table(summarize_clip_map(df), tolerance=1.10)  # one stable row: lr 0.01
    assert t["stable_rows"].tolist() == [1, 1, 1]
    assert t.loc["norm 1", "good_rows"] == 1 and t.loc["autoclip p10", "good_rows"] == 1
    assert t.loc["none", "good_rows"] == 0
    e = edge_table(df)  # one edge row: lr 0.03
    assert e.to_dict("index") == {"norm 1": {"finite_folds": 2, "folds": 2}, "none": {"finite_folds": 1, "folds": 2},
                                  "autoclip p10": {"finite_folds": 0, "folds": 2}}


def test_stability_map_runs_each_cell_and_reads_each_fate(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    df = stability_map("ishigami", lrs=[1e-3], settings=clip_settings([None, 1.0], ["autoclip"]), max_steps=3,
                       **ONE_CORE)
    assert list(df.columns[:len(ROW_COLUMNS)]) == ROW_COLUMNS
    assert df["setting"].tolist() == ["none", "norm 1", "autoclip p10"] and (df["n_steps"] == 3).all()
    assert df["gradient_clip_val"].isna().tolist() == [True, False, True]
    assert not df["nonfinite"].any() and (df["fate"] == "finite").all() and np.isfinite(df["final_loss"]).all()
    assert df.loc[1, "clipped_fraction"] == 1.0 and df.loc[0, "clipped_fraction"] == 0.0  # norms ~10 > 1
    # Dyconex raw: NaN at step 0 whatever the clipping, and the row says so from the fate
    dy = stability_map({"raw": reproduction_config("dyconex")}, lrs=[1e-4], settings=["none", "zclip"], max_steps=2,
                       **ONE_CORE)
    assert dy["dataset"].tolist() == ["raw", "raw"] and dy["fix"].isna().all()
    assert dy["nonfinite"].all() and (dy["first_nonfinite_step"] == 0).all() and (dy["fate"] == "dead").all()


def test_clip_sweep_rows_and_table(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    df = clip_sweep("ishigami", lr=1e-2, clip_values=[None, 0.1], max_steps=4, seeds=[0, 1], **ONE_CORE)
    assert df[["setting", "seed"]].values.tolist() == [["none", 0], ["none", 1], ["norm 0.1", 0], ["norm 0.1", 1]]
    t = clip_sweep_table(df)
    assert t.index.tolist() == ["none", "norm 0.1"] and t["runs"].tolist() == [2, 2]
    assert t.loc["none", "clipped_fraction"] == 0.0 and t.loc["norm 0.1", "clipped_fraction"] == 1.0


# ------------------------------------------------------------------------------------------ seed rates
def test_seed_rates_read_the_fates_and_the_writeup_pattern():
    #           seed, fold, first non-finite step, fate
    cells = [(0, 0, None, "finite"), (0, 1, 186, "dead"), (0, 2, None, "blown_up"),
             (1, 0, 12, "dead"), (1, 1, None, "finite"), (1, 2, 73, "recovered"),
             (2, 0, None, "finite"), (2, 1, None, "finite"), (2, 2, None, "finite")]
    rows = pd.DataFrame([dict.fromkeys(ROW_COLUMNS, math.nan) | {
        "dataset": "ishigami", "fix": "none", "seed": s, "fold": f, "first_nonfinite_step": step,
        "first_nonfinite_loss_step": step if fate == "dead" else None, "nonfinite": step is not None, "fate": fate,
        "final_val_rmse": 2.0 if step is None else math.nan} for s, f, step, fate in cells], columns=ROW_COLUMNS)
    rows["first_nonfinite_step"] = rows["first_nonfinite_step"].astype("Int64")
    per_seed, rates = seed_rates(rows)
    assert per_seed["pattern"].tolist() == [True, False, False]  # seed 1: fold 0 went non-finite too
    assert per_seed["nonfinite_folds"].tolist() == [[1], [0, 2], []]
    assert per_seed["dead_folds"].tolist() == [[1], [0], []]
    assert rates["p_fold_nonfinite"] == {"k": 3, "n": 9, "rate": 3 / 9}
    assert rates["p_fold_dead"]["k"] == 2 and rates["p_fold_nonfinite_loss"]["k"] == 2
    assert rates["pattern_rate"] == {"k": 1, "n": 3, "rate": 1 / 3}
    assert rates["any_nonfinite_rate"]["k"] == 2 and rates["first_nonfinite_steps"] == [12, 73, 186]
    assert rates["fates"] == {"finite": 5, "blown_up": 1, "recovered": 1, "dead": 2}
    assert rates["n_finite_folds"] == 6 and rates["median_val_rmse_finite_folds"] == 2.0


# --------------------------------------------------------------------------------------------- specs
def test_the_shipped_specs_load_and_the_fix_matrix_has_every_fix():
    assert sweep_names() == ["ablation", "ablation-prenorm", "clip-sweep", "clip-sweep-layers", "fix-matrix", "seed-rates",
                             "stability-map", "stability-map-layers"]
    fm = load_spec("fix-matrix")
    assert sorted(fm.fixes) == sorted(FIXES), "a fix in prot_lib/configs/fixes/ is missing from fix-matrix.yaml"
    quick = {name: spec_cells(load_spec(name, quick=True)) for name in sweep_names()}
    assert {n: len(c) for n, c in quick.items()} == {"ablation": 2, "ablation-prenorm": 1, "clip-sweep": 4, "clip-sweep-layers": 4,
                                                      "fix-matrix": 20,
                                                      "seed-rates": 4, "stability-map": 12, "stability-map-layers": 4}
    assert all(c.max_steps == 25 for cells in quick.values() for c in cells)  # about a minute on 2 cores
    seeds = load_spec("seed-rates")
    assert seeds.seeds == list(range(20)) and seeds.split_folds
    assert len(spec_cells(seeds)) == 100  # 20 seeds x 5 folds


def test_a_bad_spec_names_the_file_and_the_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"kind": "stability-map", "bases": {"ishigami": {"fixes": ["clipp"]}},
                                   "settings": ["none", "norm one"]}))
    with pytest.raises(ConfigError) as err:
        load_spec(bad)
    msg = str(err.value)
    assert str(bad) in msg and "bases.ishigami.fixes" in msg and "unknown fixes ['clipp']" in msg
    assert "settings" in msg and "'norm one'" in msg
    with pytest.raises(ConfigError, match="no sweep spec 'fix-matrx'; shipped: ablation, ablation-prenorm, clip-sweep, clip-sweep-layers, fix-matrix"):
        load_spec("fix-matrx")


# --------------------------------------------------------------------------------- recommended config
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
        # the YAML is the recommendation: applied to the reproduction it gives the same config
        assert reproduction_config(dataset).updated(loaded).updated({"name": cfg.name}) == cfg
    assert recommended_config("ishigami").training.lr == 3e-3 and recommended_config("dyconex").training.max_epochs == 10
    assert recommended_config("ishigami", {"training.lr": 1e-3}).training.lr == 1e-3


def test_row_columns_hold_the_fate_columns():
    assert set(FATE_COLUMNS) < set(ROW_COLUMNS) and "nonfinite" in ROW_COLUMNS


def test_p_as_many_or_more_is_fisher_s_one_sided_exact_test():
    from prot_lib.experiments import p_as_many_or_more

    # [[12, 13], [6, 19]]: scipy.stats.fisher_exact(..., alternative="greater") gives 0.06989 (by hand:
    # the hypergeometric tail P(X >= 12), X ~ H(N=50, K=18, n=25))
    assert p_as_many_or_more(12, 6, 25) == pytest.approx(0.0698927, rel=1e-5)
    assert p_as_many_or_more(0, 0, 5) == 1.0                      # nothing lost anywhere: no surprise
    assert p_as_many_or_more(5, 0, 5) == pytest.approx(1 / 252)   # all 5 of 10 losses in the variant: 1 / C(10, 5)
    assert p_as_many_or_more(3, 3, 10) > 0.5                      # the same count: not surprising
    assert p_as_many_or_more(2, 1, 4, n_ref=8) == pytest.approx(  # unequal groups, summed by hand
        (3 * 36 + 1 * 9) / 495)                                 # C(3,2) C(9,2) + C(3,3) C(9,1) over C(12,4)
    with pytest.raises(ValueError, match="k=6, n=5"):
        p_as_many_or_more(6, 0, 5)
