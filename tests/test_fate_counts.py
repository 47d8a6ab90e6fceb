"""prot_lib.training.fate.fold_outcomes / fate_counts: one rule for every outcome table, no value changed.

Each table that now wraps :func:`fate_counts` (``fix_table``, ``outcome_table``, ``ablation_table``,
chapter 11's two fate tables) is built twice, by its wrapper and by a reference: the body it had before
the refactor (copied below verbatim from commit ddb07f2), on the shipped ablation CSVs and on synthetic
folds that hold every fate, NaN RMSEs, a zero target std and a dead fold with a finite (sanitised) RMSE.
The frames must be equal exactly (``check_exact=True``: same values, dtypes, index and column order).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict, List, Tuple

import numpy as np
import pandas as pd
import pytest

from prot_lib.experiments.ablation import ablation_table
from prot_lib.experiments.fix_matrix import FIX_TABLE_COLUMNS, fix_table
from prot_lib.training.fate import FATE_COUNT_COLUMNS, OUTCOME_FLAGS, fate_counts, fold_outcomes
from prot_lib.viz.tables import OUTCOME_COLUMNS, outcome_table

SWEEPS = Path(__file__).resolve().parents[1] / "data" / "sweeps"
CSVS = ["ishigami_ablation_seeds0-1.csv", "ishigami_ablation_prenorm_seeds0-1.csv"]
#: chapter 11's call (cells "loss/targets" and "delta"): fate_counts' columns under the names the page shows
CH11_COLUMNS = {"n_folds": "folds", "n_nonfinite": "went_nonfinite", "n_dead": "dead", "n_blown_up": "blown_up",
                "median_rmse_ratio_usable": "median_rmse_ratio_of_live"}


# ------------------------------------------------------------------ the old bodies (ddb07f2), verbatim
def old_fix_table(rows: pd.DataFrame) -> pd.DataFrame:
    table: List[Dict[str, Any]] = []
    first_fix_of_key: Dict[Tuple[str, str], str] = {}
    for (dataset, fix), f in rows.groupby(["dataset", "fix"], sort=False):
        key = f["cell"].iloc[0]
        twin = first_fix_of_key.setdefault((dataset, key), fix)
        live = f["params_finite_end"]
        scored = live & np.isfinite(f["final_val_rmse"])
        firsts = f["first_nonfinite_step"].dropna()
        median_rmse = float(f.loc[scored, "final_val_rmse"].median()) if scored.any() else math.nan
        table.append({
            "dataset": dataset, "fix": fix, "n_folds": len(f),
            "folds_nonfinite_loss": int(f["first_nonfinite_loss_step"].notna().sum()),
            "folds_nonfinite_logged_loss": int(f["logged_loss_nonfinite"].sum()),
            "folds_nan_params_end": int((~live).sum()), "frac_nan_params_end": float((~live).mean()),
            "folds_dead": int((f["fate"] == "dead").sum()),
            "first_nonfinite_step": int(firsts.min()) if len(firsts) else None,
            "n_live_folds": int(live.sum()), "n_blown_up": int((f["fate"] == "blown_up").sum()),
            "median_val_rmse": median_rmse,
            "target_std": float(f["target_std"].mean()),
            "rmse_over_std": float(f.loc[scored, "rmse_ratio"].median()) if scored.any() else math.nan,
            "same_config_as": twin if twin != fix else None,
        })
    t = pd.DataFrame(table, columns=FIX_TABLE_COLUMNS)
    t["first_nonfinite_step"] = t["first_nonfinite_step"].astype("Int64")
    return t


def old_outcome_table(runs, folds=None) -> pd.DataFrame:
    rows = {}
    for name, run in runs.items():
        s = getattr(run, "summary", run)
        if folds is not None:
            absent = sorted(set(folds) - set(int(f) for f in s["fold"]))
            if absent:
                raise ValueError(f"variant {name!r} did not run fold(s) {absent}")
            s = s[s["fold"].isin(folds)]
        s = s.sort_values("fold")
        live = s["params_finite_end"].astype(bool)
        rmse = s.loc[live, "final_val_rmse"].astype(float)
        rmse = rmse[rmse.map(math.isfinite)]
        rows[name] = {
            "folds run": [int(f) for f in s["fold"]],
            "folds lost": [int(f) for f in s.loc[~live, "fold"]],
            "folds blown up": [int(f) for f in s.loc[live & (s["fate"] == "blown_up"), "fold"]],
            "live folds": [int(f) for f in s.loc[live, "fold"]],
            "median val RMSE, live folds": float(rmse.median()) if len(rmse) else math.nan,
        }
    return pd.DataFrame.from_dict(rows, orient="index", columns=OUTCOME_COLUMNS)


def _median(values):
    values = [float(v) for v in values]
    return float(np.median(values)) if values else math.nan


def old_ablation_table(rows: pd.DataFrame) -> pd.DataFrame:
    out: List[Dict[str, Any]] = []
    key = "variant" if "variant" in rows else "fix"
    for variant, g in rows.groupby(key, sort=False):
        dead = g["fate"] == "dead"
        blown = g["fate"] == "blown_up"
        live = ~dead & ~blown & g["rmse_ratio"].notna()
        ratio_all = g["rmse_ratio"].where(~dead, math.inf).dropna()
        out.append({
            "variant": variant, "lr": float(g["lr"].iloc[0]) if "lr" in g and g["lr"].notna().any() else math.nan,
            "n_folds": len(g), "nonfinite": int(g["nonfinite"].sum()), "dead": int(dead.sum()),
            "blown_up": int(blown.sum()), "median_rmse_ratio": _median(ratio_all),
            "median_rmse_ratio_live": _median(g.loc[live, "rmse_ratio"]),
            "worst_rmse_ratio_live": float(g.loc[live, "rmse_ratio"].max()) if live.any() else math.nan,
        })
    return pd.DataFrame(out).set_index("variant")


def old_ch11_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Chapter 11's inline block (its loss/targets cell; the delta cell is the same on ``dt_rows``)."""
    runs = runs.copy()
    runs["went_nonfinite"] = runs["first_nonfinite_step"].notna()
    runs["live"] = ~runs["fate"].isin(["dead", "blown_up"])
    return runs.groupby("case", sort=False).agg(
        folds=("fold", "size"), went_nonfinite=("went_nonfinite", "sum"), dead=("fate", lambda f: int((f == "dead").sum())),
        blown_up=("fate", lambda f: int((f == "blown_up").sum())),
        median_rmse_ratio_of_live=("rmse_ratio", lambda r: float(r[runs.loc[r.index, "live"]].median())))


# ------------------------------------------------------------------------------------- the folds
#: (first_nonfinite_step, first_nonfinite_loss_step, params_finite_end, final_val_rmse, target_std, fate)
KINDS = {
    "finite": (None, None, True, 1.7, 3.4, "finite"),
    "finite, no validation": (None, None, True, math.nan, 3.4, "finite"),    # max_steps before an epoch ended
    "finite, zero target std": (None, None, True, 0.9, 0.0, "finite"),      # ratio undefined
    "finite, no target std": (None, None, True, 0.9, math.nan, "finite"),
    "recovered": (40, None, True, 2.9, 3.4, "recovered"),                   # a non-finite gradient, skipped
    "blown up": (None, None, True, 11.0, 3.3, "blown_up"),
    "dead, weights": (12, 12, False, math.nan, 3.4, "dead"),
    "dead, weights, sanitised rmse": (7, 9, False, 3.5, 3.5, "dead"),       # finite RMSE of nan_to_num'd output
    "dead, val only": (201, 201, True, math.nan, 3.6, "dead"),              # weights finite, val loss inf
}


def synthetic_rows(n: int = 240, seed: int = 0) -> pd.DataFrame:
    """``n`` fold rows as a sweep writes them (:func:`prot_lib.experiments.cells.rows_frame` dtypes), every
    kind of :data:`KINDS` in several groups, RMSEs jittered so that medians of even counts average two."""
    rng = np.random.default_rng(seed)
    kinds = list(KINDS)
    picks = [kinds[i % len(kinds)] for i in range(len(kinds))] + list(rng.choice(kinds, n - len(kinds)))
    recs = []
    for i, kind in enumerate(picks):
        first, first_loss, params_end, rmse, std, fate = KINDS[kind]
        rmse = rmse * float(rng.uniform(0.8, 1.25)) if math.isfinite(rmse) else rmse
        first = None if first is None else first + int(rng.integers(0, 50))
        first_loss = None if first_loss is None else max(first, first_loss)  # the loss is never earlier than the first
        recs.append({
            "dataset": ["ishigami", "dyconex"][i % 2], "fix": f"fix {i % 5}", "seed": i // 10, "fold": (i // 5) % 5,
            "lr": [2e-2, 1e-3, math.nan][i % 3] if i % 5 != 4 else 1e-4,
            "first_nonfinite_loss_step": first_loss, "first_nonfinite_step": first, "params_finite_end": params_end,
            "val_finite_end": math.isfinite(rmse), "final_val_rmse": rmse, "target_std": std,
            "rmse_ratio": rmse / std if math.isfinite(rmse) and std > 0 else math.nan, "fate": fate,
            "nonfinite": first is not None, "logged_loss_nonfinite": first_loss is not None and i % 3 == 0,
        })
    rows = pd.DataFrame(recs)
    rows["cell"] = rows["dataset"] + "/" + rows["fix"].replace({"fix 3": "fix 1"})  # fix 3 is fix 1's run
    for c in ("first_nonfinite_loss_step", "first_nonfinite_step"):
        rows[c] = pd.array(rows[c].tolist(), dtype="Int64")
    return rows


def all_dead_group(rows: pd.DataFrame) -> pd.DataFrame:
    """A group in which every fold dies: no live, scored or usable fold, every median NaN or inf."""
    dead = rows[rows["fate"] == "dead"].head(4).assign(fix="all dead", dataset="ishigami")
    return pd.concat([rows, dead.assign(cell="ishigami/all dead")], ignore_index=True)


def shipped(name: str) -> pd.DataFrame:
    return pd.read_csv(SWEEPS / name)


# ------------------------------------------------------------------------------------- the tests
def test_fold_outcomes_classes():
    rows = pd.DataFrame([dict(zip(["first_nonfinite_step", "first_nonfinite_loss_step", "params_finite_end",
                                   "final_val_rmse", "target_std", "fate"], v), kind=k) for k, v in KINDS.items()])
    rows["rmse_ratio"] = rows["final_val_rmse"] / rows["target_std"]
    o = fold_outcomes(rows).set_axis(rows["kind"])
    assert list(o.columns) == OUTCOME_FLAGS and all(o.dtypes == bool)
    # lost = weights non-finite at the end; a dead fold whose weights are finite (val only) is still live
    assert list(o.index[o["lost"]]) == ["dead, weights", "dead, weights, sanitised rmse"]
    assert o.loc["dead, val only", "live"] and o.loc["dead, val only", "dead"]
    # scored: live with a finite RMSE; the sanitised finite RMSE of a lost fold is not scored
    assert list(o.index[o["scored"]]) == ["finite", "finite, zero target std", "finite, no target std", "recovered",
                                         "blown up"]
    assert list(o.index[~o["usable"]]) == ["blown up", "dead, weights", "dead, weights, sanitised rmse",
                                          "dead, val only"]
    assert list(o.index[o["went_nonfinite"]]) == ["recovered", "dead, weights", "dead, weights, sanitised rmse",
                                                 "dead, val only"]
    assert list(o.index[o["loss_nonfinite"]]) == ["dead, weights", "dead, weights, sanitised rmse", "dead, val only"]


def test_fate_counts_values_by_hand():
    kinds = ["finite", "recovered", "blown up", "dead, weights", "dead, weights, sanitised rmse", "dead, val only",
             "finite, no validation"]
    rows = pd.DataFrame([dict(zip(["first_nonfinite_step", "first_nonfinite_loss_step", "params_finite_end",
                                   "final_val_rmse", "target_std", "fate"], KINDS[k])) for k in kinds])
    rows["rmse_ratio"] = [0.5, 0.9, 3.3, math.nan, 1.0, math.nan, math.nan]
    rows["group"] = "g"
    c = fate_counts(rows, "group").loc["g"]
    assert list(c.index) == FATE_COUNT_COLUMNS
    assert (c["n_folds"], c["n_nonfinite"], c["n_nonfinite_loss"], c["n_lost"], c["n_live"], c["n_dead"],
            c["n_blown_up"], c["n_usable"]) == (7, 4, 3, 2, 5, 3, 1, 3)
    assert c["first_nonfinite_step"] == 7
    assert c["median_val_rmse"] == pytest.approx(2.9)          # scored: finite 1.7, recovered 2.9, blown up 11.0
    assert c["median_rmse_ratio_live"] == pytest.approx(0.9)                          # their ratios 0.5, 0.9, 3.3
    assert c["median_rmse_ratio"] == math.inf                                         # 0.5, 0.9, 3.3, inf, inf, inf
    assert c["median_rmse_ratio_usable"] == pytest.approx(0.7)                        # 0.5, 0.9 (no-validation skipped)
    assert c["worst_rmse_ratio_usable"] == pytest.approx(0.9)
    assert c["target_std"] == pytest.approx(np.mean([3.4, 3.4, 3.3, 3.4, 3.5, 3.6, 3.4]))


def test_fate_counts_groups_and_columns():
    rows = synthetic_rows()
    t = fate_counts(rows, ["dataset", "fix"])
    assert t.index.names == ["dataset", "fix"]
    assert list(t.index) == list(dict.fromkeys(zip(rows["dataset"], rows["fix"])))
    assert t["n_folds"].sum() == len(rows) and (t["n_live"] + t["n_lost"] == t["n_folds"]).all()
    assert str(t["first_nonfinite_step"].dtype) == "Int64"
    shown = fate_counts(rows, "fix", columns={"n_dead": "dead", "n_folds": "folds"})
    assert list(shown.columns) == ["dead", "folds"] and shown.index.name == "fix"
    # rows concatenated without ignore_index repeat labels: each fold still counts once
    twice = pd.concat([rows, rows])
    pd.testing.assert_frame_equal(fate_counts(twice, "fix")[["n_folds", "n_dead"]],
                                  2 * fate_counts(rows, "fix")[["n_folds", "n_dead"]], check_exact=True)
    assert fold_outcomes(twice)["dead"].sum() == 2 * fold_outcomes(rows)["dead"].sum()
    # only what a requested column needs is read: the fates alone give the fate counts
    dead = fate_counts(rows[["fix", "fate"]], "fix", columns={"n_dead": "dead"})["dead"]
    assert dead.sum() == (rows["fate"] == "dead").sum()


@pytest.mark.parametrize("bad, error, words", [
    (lambda r: r.drop(columns="rmse_ratio"), KeyError, "rmse_ratio"),
    (lambda r: r.drop(columns="fix"), KeyError, "fix"),
    (lambda r: r.assign(fate=r["fate"].where(r.index != 3, "exploded")), ValueError, "row 3, column 'fate'"),
])
def test_fate_counts_bad_rows(bad, error, words):
    with pytest.raises(error, match=words):
        fate_counts(bad(synthetic_rows(20)), "fix")
    with pytest.raises(KeyError, match="n_alive"):
        fate_counts(synthetic_rows(20), "fix", columns={"n_alive": "alive"})


@pytest.mark.parametrize("rows", [synthetic_rows(), all_dead_group(synthetic_rows(seed=1)), synthetic_rows(60, 2)],
                         ids=["synthetic", "all dead", "small"])
def test_fix_table_unchanged(rows):
    new = fix_table(rows)
    assert new["same_config_as"].notna().any() and new["n_blown_up"].gt(0).any()  # the rows exercise both
    pd.testing.assert_frame_equal(new, old_fix_table(rows), check_exact=True)


@pytest.mark.parametrize("name", CSVS)
def test_fix_table_unchanged_on_shipped_rows(name):
    rows = shipped(name).assign(fix=lambda r: r["variant"])
    rows["cell"] = rows["variant"].replace({"reproduction": "recommended"})   # a twin, for same_config_as
    pd.testing.assert_frame_equal(fix_table(rows), old_fix_table(rows), check_exact=True)


@pytest.mark.parametrize("name", CSVS)
def test_ablation_table_unchanged_on_shipped_rows(name):
    rows = shipped(name)
    new = ablation_table(rows)
    assert new["n_folds"].sum() == len(rows) and new["nonfinite"].sum() == rows["nonfinite"].sum()
    pd.testing.assert_frame_equal(new, old_ablation_table(rows), check_exact=True)


@pytest.mark.parametrize("key", ["variant", "fix"])
def test_ablation_table_unchanged_on_synthetic_rows(key):
    rows = all_dead_group(synthetic_rows())
    rows = rows.rename(columns={"fix": "variant"}) if key == "variant" else rows
    new = ablation_table(rows)
    assert math.isnan(new["lr"].iloc[2])  # a variant whose first row has no lr: NaN, not the next row's
    assert np.isinf(new["median_rmse_ratio"]).any() and new["median_rmse_ratio_live"].isna().any()
    pd.testing.assert_frame_equal(new, old_ablation_table(rows), check_exact=True)
    pd.testing.assert_frame_equal(ablation_table(rows.drop(columns="lr")), old_ablation_table(rows.drop(columns="lr")),
                                  check_exact=True)


def _summaries(rows: pd.DataFrame) -> Dict[str, pd.DataFrame]:
    """One KFoldResult-like summary per fix: folds 0..n-1, in a shuffled order."""
    out = {}
    for fix, g in rows.groupby("fix", sort=False):
        g = g.drop_duplicates("fold").sample(frac=1.0, random_state=0)
        out[fix] = g.reset_index(drop=True)
    return out


@pytest.mark.parametrize("folds", [None, [1, 3], []])
def test_outcome_table_unchanged(folds):
    runs = _summaries(all_dead_group(synthetic_rows()))
    if folds:  # only the variants that ran them (else both raise)
        runs = {k: s for k, s in runs.items() if set(folds) <= set(s["fold"])}
        assert len(runs) >= 3
    new = outcome_table(runs, folds=folds)
    pd.testing.assert_frame_equal(new, old_outcome_table(runs, folds=folds), check_exact=True)
    if folds is None:
        assert new.loc["all dead", "live folds"] == []
        assert math.isnan(new.loc["all dead", "median val RMSE, live folds"])
    pd.testing.assert_frame_equal(outcome_table({}), old_outcome_table({}), check_exact=True)


@pytest.mark.parametrize("rows", [synthetic_rows(), all_dead_group(synthetic_rows(seed=1))],
                         ids=["synthetic", "all dead"])
@pytest.mark.parametrize("steps", ["Int64", "object"])  # chapter 11's delta rows mix engine rows and fold_rows()
def test_chapter11_tables_unchanged(rows, steps):
    rows = rows.assign(case=rows["fix"])
    if steps == "object":
        rows["first_nonfinite_step"] = [None if pd.isna(v) else int(v) for v in rows["first_nonfinite_step"]]
        rows["first_nonfinite_step"] = rows["first_nonfinite_step"].astype(object)
    pd.testing.assert_frame_equal(fate_counts(rows, "case", columns=CH11_COLUMNS), old_ch11_table(rows),
                                  check_exact=True)
    # the page's scatter of live folds: the old ``live`` column is fold_outcomes' usable
    pd.testing.assert_series_equal(fold_outcomes(rows)["usable"], ~rows["fate"].isin(["dead", "blown_up"]),
                                   check_names=False)


@pytest.mark.parametrize("name", CSVS)
def test_chapter11_tables_unchanged_on_shipped_rows(name):
    rows = shipped(name).assign(case=lambda r: r["variant"])
    pd.testing.assert_frame_equal(fate_counts(rows, "case", columns=CH11_COLUMNS), old_ch11_table(rows),
                                  check_exact=True)
