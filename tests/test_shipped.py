"""Shipped sweeps: reading them (prot_lib.experiments.shipped) and checking a live re-run against them."""
import json

import numpy as np
import pandas as pd
import pytest

from prot_lib.experiments import FixMatrix, fix_table
from prot_lib.experiments.shipped import ShippedMismatch, compare_to_shipped, load_shipped
from prot_lib.training.fate import FATES


def _rows(**changes):
    base = pd.DataFrame({"dataset": ["ishigami"] * 3, "fix": ["none", "clip", "none"], "seed": [0, 0, 0],
                         "fold": [0, 0, 1], "fate": ["finite", "dead", "finite"], "rmse_ratio": [0.5, np.nan, 0.8],
                         "nonfinite": [False, True, False], "wall_s": [1.0, 2.0, 3.0]})
    for col, values in changes.items():
        base[col] = values
    return base


def test_compare_returns_the_pairs_and_their_relative_difference():
    shipped = _rows()
    live = _rows(rmse_ratio=[0.505, np.nan, 0.8]).iloc[[0, 1]]
    m = compare_to_shipped(live, shipped, on=["dataset", "fix", "fold"])
    assert m["rmse_ratio_shipped"].tolist()[0] == 0.5
    np.testing.assert_allclose(m["rel_diff"].to_numpy(), [0.01, 0.0])  # a dead fold's NaN agrees with NaN


def test_compare_names_a_fate_that_differs():
    live = _rows(fate=["finite", "finite", "finite"], rmse_ratio=[0.5, 0.7, 0.8])
    with pytest.raises(ShippedMismatch, match=r"ishigami/clip/0: fate finite here, dead shipped"):
        compare_to_shipped(live, _rows(), on=["dataset", "fix", "fold"])


def test_compare_names_a_ratio_beyond_the_tolerance_and_a_row_not_shipped():
    live = pd.concat([_rows(rmse_ratio=[0.6, np.nan, 0.8]), _rows(fold=[7, 7, 7]).iloc[[0]]])
    with pytest.raises(ShippedMismatch) as err:
        compare_to_shipped(live, _rows(), on=["dataset", "fix", "fold"])
    msg = str(err.value)
    assert "2 of 4 live fold runs differ" in msg
    assert "ishigami/none/0: rmse_ratio 0.6 here, 0.5 shipped" in msg and "ishigami/none/7: not in the shipped sweep" in msg


def test_compare_fails_on_one_nan_side_and_on_a_missing_key_column():
    with pytest.raises(ShippedMismatch, match="rmse_ratio nan here, 0.5 shipped"):
        compare_to_shipped(_rows(rmse_ratio=[np.nan, np.nan, 0.8]), _rows(), on=["fix", "fold"])
    with pytest.raises(KeyError, match=r"live rows lack column\(s\) \['lr'\]"):
        compare_to_shipped(_rows(), _rows(), on=["lr"])


def test_load_shipped_names_the_missing_file_and_column(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.csv: no such shipped sweep file"):
        load_shipped("nope", folder=tmp_path)
    _rows().drop(columns=["fate"]).to_csv(tmp_path / "x.csv", index=False)
    (tmp_path / "x.json").write_text(json.dumps({"spec": {}, "cells_done": 1, "cells_total": 1, "missing": []}))
    with pytest.raises(ValueError, match=r"x\.csv: missing column\(s\) \['fate'\]"):
        load_shipped("x", folder=tmp_path)
    _rows().to_csv(tmp_path / "x.csv", index=False)
    s = load_shipped("x", folder=tmp_path)
    assert s.complete and len(s.rows) == 3 and s.caption() == "3 fold runs, data/sweeps/x.csv"


def test_a_fix_matrix_from_rows_without_cells_is_the_one_with_them():
    """Shipped rows have no ``cell``: from_rows restores today's key, so ``same_config_as`` still says that
    Dyconex's lower-lr is the none run (its shipped lr already is 1e-4)."""
    from prot_lib.experiments import grid_cells

    rows = pd.DataFrame({"dataset": ["dyconex"] * 4, "fix": ["none", "none", "lower-lr", "lower-lr"],
                         "fold": [0, 1, 0, 1], "fate": ["dead"] * 4, "rmse_ratio": [np.nan] * 4,
                         "first_nonfinite_step": [0] * 4, "first_nonfinite_loss_step": [0] * 4,
                         "first_nonfinite_grad_step": [np.nan] * 4, "first_nonfinite_param_step": [0] * 4,
                         "params_finite_end": [False] * 4, "val_finite_end": [False] * 4,
                         "final_val_rmse": [np.nan] * 4, "target_std": [1.0] * 4, "logged_loss_nonfinite": [True] * 4})
    m = FixMatrix.from_rows(rows)
    assert m.row("dyconex", "lower-lr")["same_config_as"] == "none" and pd.isna(m.row("dyconex", "none")["same_config_as"])
    assert m.row("dyconex", "none")["folds_nan_params_end"] == 2 and m.per_fold["loss_nonfinite"].all()
    keyed = rows.assign(cell=grid_cells({"dyconex": {}}, fixes=["none"])[0].key)
    pd.testing.assert_frame_equal(m.table, fix_table(keyed))


# ------------------------------------------------------------------ the files in data/sweeps/
SHIPPED = ["ishigami_ablation_seeds0-1", "ishigami_ablation_prenorm_seeds0-1", "fix_matrix_ishigami_dyconex",
           "layers_stability_map_ishigami_dyconex",
           "stability_map_ishigami_dyconex", "ishigami_layers_clip_sweep_seeds0-2"]


@pytest.mark.parametrize("stem", SHIPPED)
def test_a_shipped_sweep_is_its_whole_spec_with_its_provenance(stem):
    """Every cell of the spec it names, one row per fold run of those cells, the spec unchanged since, and
    where it came from: commit, wall time, machine, a command with repo-relative paths only."""
    from prot_lib.experiments import load_spec, spec_cells

    s = load_shipped(stem)
    spec = load_spec(s.meta["spec"]["name"])
    cells = spec_cells(spec)
    assert s.complete and s.meta["cells_total"] == len(cells)
    assert len(s.rows) == s.meta["fold_runs"] == sum(len(c.folds) for c in cells)
    assert {k: v for k, v in s.meta["spec"].items() if k != "quick"} == \
        {k: v for k, v in spec.model_dump().items() if k != "quick"}
    assert s.meta["commit"] and s.meta["wall_s"] > 0 and s.meta["machine"]
    assert not [w for w in s.meta["command"].split() if w.startswith("/")]
    assert s.rows["fate"].isin(FATES).all()


def test_the_shipped_fix_matrix_holds_what_chapter_9_states():
    m = FixMatrix.from_rows(load_shipped("fix_matrix_ishigami_dyconex").rows)
    assert m.table.groupby("dataset")["n_folds"].unique().map(list).to_dict() == {"dyconex": [5], "ishigami": [5]}
    dy, ish = (lambda fix: m.row("dyconex", fix)), (lambda fix: m.row("ishigami", fix))
    assert dy("none")["folds_nan_params_end"] == 5 and dy("none")["first_nonfinite_step"] == 0
    assert ish("none")["folds_nan_params_end"] >= 1 and dy("lower-lr")["same_config_as"] == "none"
    for ds, fix in (("dyconex", "normalize"), ("ishigami", "postnorm"), ("ishigami", "layernorm"), ("dyconex", "all")):
        assert m.row(ds, fix)["folds_nan_params_end"] == 0, (ds, fix)
    cols = ["fold", "fate", "first_nonfinite_step"]
    pf = m.per_fold
    for ds in ("ishigami", "dyconex"):  # the write-up's dict clip is the unclipped run, fold for fold
        pd.testing.assert_frame_equal(pf.query("dataset == @ds and fix == 'dict-clip'")[cols].reset_index(drop=True),
                                      pf.query("dataset == @ds and fix == 'none'")[cols].reset_index(drop=True))


def test_the_shipped_stability_map_fails_at_its_largest_lr_and_never_at_its_smallest():
    from prot_lib.experiments import stability_pivot

    rows = load_shipped("stability_map_ishigami_dyconex").rows
    for ds, df in rows.groupby("dataset"):
        p = stability_pivot(df)
        assert p.shape == (5, 6), ds
        assert (p.loc[p.index.max()] > 0).all() and (p.loc[p.index.min()] == 0).all(), ds


def test_the_shipped_clip_sweep_loses_folds_with_and_without_clip_1():
    rows = load_shipped("ishigami_layers_clip_sweep_seeds0-2").rows
    rates = rows.groupby("setting")["nonfinite"].mean()
    assert rates["none"] > 0 and rates["norm 1"] > 0
    assert (rows.loc[rows["setting"] == "norm 0.1", "clipped_fraction"] > 0.9).all()


def test_the_shipped_layers_clip_map_loses_every_fold_at_its_largest_lr():
    """Chapter 10: at lr 0.1 every setting, fixed or adaptive, loses every fold on both datasets."""
    rows = load_shipped("layers_stability_map_ishigami_dyconex").rows
    assert sorted(rows["setting"].unique()) == sorted(["none", "norm 0.1", "norm 1", "norm 10", "autoclip p10", "zclip"])
    assert rows.loc[rows["lr"] == rows["lr"].max(), "nonfinite"].all()
    assert not rows.loc[(rows["lr"] == rows["lr"].min()) & (rows["setting"] == "none"), "nonfinite"].any()
