"""prot_lib.viz.tables: the run-summary tables the chapters show (named columns, values read back)."""
import math

import pandas as pd
import pytest

from prot_lib.training.kfold import SUMMARY_COLUMNS
from prot_lib.viz.tables import OUTCOME_COLUMNS, fold_table, outcome_table


def _summary(rows):
    """A summary with every SUMMARY_COLUMNS column: the given values, the rest empty (as run_kfold leaves them)."""
    base = {c: None for c in SUMMARY_COLUMNS}
    base.update(n_skipped=0, n_rollbacks=0)
    return pd.DataFrame([{**base, **r} for r in rows], columns=SUMMARY_COLUMNS)


FOLDS = _summary([
    dict(fold=2, first_nonfinite_step=183, fate="dead", params_finite_end=False, final_val_rmse=math.nan, rmse_ratio=math.nan),
    dict(fold=0, first_nonfinite_step=None, fate="finite", params_finite_end=True, final_val_rmse=1.5, rmse_ratio=0.45),
    dict(fold=1, first_nonfinite_step=None, fate="finite", params_finite_end=True, final_val_rmse=0.5, rmse_ratio=0.15),
    dict(fold=3, first_nonfinite_step=None, fate="blown_up", params_finite_end=True, final_val_rmse=12.0, rmse_ratio=3.5),
])


def test_fold_table_named_columns_sorted_by_fold_policy_columns_dropped_when_unused():
    t = fold_table(FOLDS)
    assert list(t.columns) == ["first non-finite step", "fate", "val RMSE", "val RMSE / target std"]
    assert list(t.index) == [0, 1, 2, 3] and t.index.name == "fold"
    assert t.loc[2, "first non-finite step"] == 183 and t.loc[2, "fate"] == "dead"
    assert t.loc[3, "val RMSE"] == 12.0 and t.loc[3, "val RMSE / target std"] == 3.5
    assert pd.isna(t.loc[0, "first non-finite step"])


def test_fold_table_keeps_a_policy_column_some_fold_used():
    s = FOLDS.copy()
    s.loc[s["fold"] == 2, "n_rollbacks"] = 4
    t = fold_table(s)
    assert list(t.columns)[-1] == "rollbacks" and "steps skipped" not in t
    assert t["rollbacks"].tolist() == [0, 0, 4, 0]


def test_outcome_table_lost_blown_up_and_median_over_live_folds():
    other = _summary([
        dict(fold=0, first_nonfinite_step=120, fate="dead", params_finite_end=False, final_val_rmse=5.0, rmse_ratio=1.4),
        dict(fold=1, first_nonfinite_step=None, fate="finite", params_finite_end=True, final_val_rmse=2.0, rmse_ratio=0.6),
        dict(fold=2, first_nonfinite_step=None, fate="finite", params_finite_end=True, final_val_rmse=1.0, rmse_ratio=0.3),
        dict(fold=3, first_nonfinite_step=None, fate="finite", params_finite_end=True, final_val_rmse=3.0, rmse_ratio=0.9),
    ])
    t = outcome_table({"none": FOLDS, "warmup": other})
    assert list(t.columns) == OUTCOME_COLUMNS and list(t.index) == ["none", "warmup"]
    assert t.loc["none", "folds lost"] == [2] and t.loc["none", "folds blown up"] == [3]
    assert t.loc["none", "live folds"] == [0, 1, 3]
    assert t.loc["none", "median val RMSE, live folds"] == 1.5        # of 1.5, 0.5, 12.0
    # a lost fold's RMSE is left out even when finite (sanitised predictions can make it so)
    assert t.loc["warmup", "folds lost"] == [0] and t.loc["warmup", "median val RMSE, live folds"] == 2.0
    sub = outcome_table({"none": FOLDS, "warmup": other}, folds=[0, 2])
    assert sub.loc["none", "folds run"] == [0, 2] and sub.loc["none", "median val RMSE, live folds"] == 1.5
    assert sub.loc["warmup", "live folds"] == [2] and sub.loc["warmup", "median val RMSE, live folds"] == 1.0


def test_outcome_table_no_live_fold_gives_nan_and_bad_input_raises():
    t = outcome_table({"dead": FOLDS[FOLDS["fold"] == 2]})
    assert t.loc["dead", "folds lost"] == [2] and math.isnan(t.loc["dead", "median val RMSE, live folds"])
    with pytest.raises(ValueError, match=r"did not run fold\(s\) \[4\]"):
        outcome_table({"none": FOLDS}, folds=[0, 4])
    with pytest.raises(TypeError, match="params_finite_end"):
        fold_table(FOLDS.drop(columns=["params_finite_end"]))
