"""Run summaries as tables a reader can follow: named columns, none that are empty by construction.

A :class:`~prot_lib.training.kfold.KFoldResult`'s ``summary`` has one row per fold and 19 columns (the
fate columns of :mod:`prot_lib.training.fate` plus the ``training.on_nonfinite`` policy's columns and
the autopsy's verdict and bundle). Most are empty in a given run: the three ``first_nonfinite_*_step``
columns agree unless a fold died in an unusual order, and the policy columns are 0 or None unless a
run skipped or rolled back steps. The chapters show :func:`fold_table` instead, and
:func:`outcome_table` when several variants of a run are set side by side.

Nothing here recomputes a fate: every value is read from the summary, where
:func:`prot_lib.training.fate.fold_fate` wrote it once, and :func:`outcome_table` sorts and counts the
folds with :func:`prot_lib.training.fate.fold_outcomes` and :func:`~prot_lib.training.fate.fate_counts`.
"""
from __future__ import annotations

from typing import Mapping, Optional, Sequence

import pandas as pd

from ..training.fate import fate_counts, fold_outcomes

__all__ = ["FOLD_COLUMNS", "POLICY_COLUMNS", "OUTCOME_COLUMNS", "fold_table", "outcome_table"]

#: summary column -> the name a chapter shows, in order
FOLD_COLUMNS = {
    "first_nonfinite_step": "first non-finite step",
    "fate": "fate",
    "final_val_rmse": "val RMSE",
    "rmse_ratio": "val RMSE / target std",
}
#: policy columns (``training.on_nonfinite: skip | rollback``), shown only when some fold used them
POLICY_COLUMNS = {"n_skipped": "steps skipped", "n_rollbacks": "rollbacks"}
#: the columns of :func:`outcome_table`
OUTCOME_COLUMNS = ["folds run", "folds lost", "folds blown up", "live folds", "median val RMSE, live folds"]


def _summary_of(run) -> pd.DataFrame:
    summary = getattr(run, "summary", run)
    missing = [c for c in ("fold", "params_finite_end", *FOLD_COLUMNS) if not isinstance(summary, pd.DataFrame)
               or c not in summary]
    if missing:
        raise TypeError(f"pass a KFoldResult or its summary; missing summary column(s) {missing}")
    return summary


def fold_table(run) -> pd.DataFrame:
    """One row per fold, indexed by ``fold``: the outcome in :data:`FOLD_COLUMNS`' named columns.

    Args:
        run: a :class:`~prot_lib.training.kfold.KFoldResult` or its ``summary`` (any subset of folds).

    Returns:
        columns "first non-finite step" (the earliest step at which a loss, gradient or weight was
        inf/NaN; <NA>: never), "fate" (finite / blown_up / recovered / dead, :data:`prot_lib.training.fate.FATES`),
        "val RMSE" (last validation RMSE, target units), "val RMSE / target std" (1.0 = predicting the
        mean); then "steps skipped" and "rollbacks" only if some fold has a non-zero count.

    Raises:
        TypeError: ``run`` is neither a run nor a summary with these columns (names the missing ones).
    """
    s = _summary_of(run).sort_values("fold")
    cols = dict(FOLD_COLUMNS)
    cols.update({c: name for c, name in POLICY_COLUMNS.items() if c in s and (s[c].fillna(0) != 0).any()})
    return s.set_index("fold")[list(cols)].rename(columns=cols)


def outcome_table(runs: Mapping[str, object], folds: Optional[Sequence[int]] = None) -> pd.DataFrame:
    """One row per variant of a run: which folds it lost, which blew up, the median RMSE of the rest.

    A fold is *lost* when its weights are non-finite at the end (``params_finite_end`` False), *live*
    otherwise (the rule of :func:`prot_lib.experiments.fix_matrix.fix_table`); a live fold is *blown up*
    when its fate says so (finite, but val RMSE >= 2 target std). The classes are
    :func:`prot_lib.training.fate.fold_outcomes`', the median :func:`~prot_lib.training.fate.fate_counts`'
    ``median_val_rmse``.

    Args:
        runs: variant name -> :class:`~prot_lib.training.kfold.KFoldResult` or its ``summary``.
        folds: compare only these folds (default: every fold of each run); a variant that did not run
            one of them raises.

    Returns:
        indexed by variant, :data:`OUTCOME_COLUMNS`: "folds run", "folds lost", "folds blown up" and
        "live folds" (sorted lists of fold numbers), "median val RMSE, live folds" (target units; the
        median over live folds with a finite RMSE, NaN if none).

    Raises:
        TypeError: a value is not a run or summary. ValueError: a variant lacks one of ``folds``, or a
        summary holds an unknown ``fate`` (names the row).
    """
    lists, frames = {}, []
    for name, run in runs.items():
        s = _summary_of(run)
        if folds is not None:
            absent = sorted(set(folds) - set(int(f) for f in s["fold"]))
            if absent:
                raise ValueError(f"variant {name!r} did not run fold(s) {absent}")
            s = s[s["fold"].isin(folds)]
        s = s.sort_values("fold")
        o = fold_outcomes(s, ["lost", "live", "blown_up"])
        lists[name] = {"folds run": [int(f) for f in s["fold"]]}
        lists[name].update({column: [int(f) for f in s.loc[which, "fold"]] for column, which in (
            ("folds lost", o["lost"]), ("folds blown up", o["live"] & o["blown_up"]), ("live folds", o["live"]))})
        frames.append(s.assign(_variant=name))
    t = pd.DataFrame.from_dict(lists, orient="index", columns=OUTCOME_COLUMNS)
    if len(t):
        median = fate_counts(pd.concat(frames, ignore_index=True), "_variant", columns={"median_val_rmse": "m"})["m"]
        t["median val RMSE, live folds"] = median.reindex(t.index).astype(float)  # NaN: a variant with no fold
    return t
