"""A fold's fate: the one definition of "went NaN", "dead", "blown up" used everywhere.

Every table, plot, sweep and test of this project reads these columns of
:attr:`prot_lib.training.KFoldResult.summary`; none recomputes them from a history. They are computed
once, by :func:`fold_fate`, where a fold is trained (:func:`prot_lib.training.kfold.run_kfold`).

Per fold, from its per-step history (``loss_finite``, ``grad_finite``, ``params_finite`` columns of
:mod:`prot_lib.training.history`) and its validation epochs:

``first_nonfinite_loss_step``
    first optimizer step whose raw training loss (before any sanitisation) is inf or NaN.
``first_nonfinite_grad_step``
    first step with a non-finite gradient (before clipping).
``first_nonfinite_param_step``
    first step after which some parameter is non-finite.
``first_nonfinite_step``
    the earliest of the three: the step at which the fold "went NaN" (the write-up's symptom);
    None when the fold stayed finite throughout. ``first_nonfinite_epoch`` is its epoch.
``params_finite_end``, ``val_finite_end``
    every weight finite after the last step; the last validation loss and RMSE finite.
``rmse_ratio``
    last validation RMSE / standard deviation of that fold's validation targets (population std,
    NaN labels ignored). 1.0 is what predicting the mean achieves; below 1 the model learned something.
``fate``
    one of :data:`FATES`, decided in this order:

    - ``"dead"``: the fold ends with a non-finite weight or a non-finite validation metric;
      nothing it predicts can be used.
    - ``"recovered"``: some step was non-finite, but the fold ends finite (a policy skipped or rolled
      back the step, or a non-finite gradient was clipped to zero).
    - ``"blown_up"``: finite at every step, but ``rmse_ratio >= BLOWN_UP_RATIO``: the fit is far worse
      than the mean predictor, the aftermath of a finite overflow (a loss spike of 1e14, say).
    - ``"finite"``: none of the above.

Many folds at once (a sweep's rows, the summaries of several runs): :func:`fold_outcomes` sorts each
fold into the classes the tables count (went non-finite, lost, live, dead, blown up, usable), and
:func:`fate_counts` counts them per group and takes the medians of the fit. Every outcome table of the
library (``fix_table``, ``outcome_table``, ``ablation_table``) and chapter 11 read these two.

The write-up's pattern on Ishigami ("the first fold trained, then a later fold went NaN") is
:func:`writeup_pattern`: fold 0 has no non-finite step and some later fold has one.
"""
from __future__ import annotations

import math
from typing import Iterable, Mapping, Optional, Sequence, Union

import numpy as np
import pandas as pd

__all__ = ["FATES", "BLOWN_UP_RATIO", "FATE_COLUMNS", "OUTCOME_FLAGS", "FATE_COUNT_COLUMNS", "fold_fate",
           "fold_outcomes", "fate_counts", "writeup_pattern"]

#: the fates, from best to worst
FATES = ("finite", "blown_up", "recovered", "dead")
#: a finite fold whose last validation RMSE is at least this many target standard deviations is
#: "blown_up" (the mean predictor scores 1.0)
BLOWN_UP_RATIO = 2.0
#: the summary columns :func:`fold_fate` fills, in order
FATE_COLUMNS = [
    "first_nonfinite_loss_step", "first_nonfinite_grad_step", "first_nonfinite_param_step",
    "first_nonfinite_step", "first_nonfinite_epoch", "params_finite_end", "val_finite_end",
    "final_val_rmse", "target_std", "rmse_ratio", "fate",
]
#: the boolean columns of :func:`fold_outcomes`, one row per fold
OUTCOME_FLAGS = ["went_nonfinite", "loss_nonfinite", "lost", "live", "scored", "dead", "blown_up", "usable"]
#: the columns of :func:`fate_counts`, one row per group
FATE_COUNT_COLUMNS = [
    "n_folds", "n_nonfinite", "n_nonfinite_loss", "n_lost", "n_live", "n_dead", "n_blown_up", "n_usable",
    "first_nonfinite_step", "target_std", "median_val_rmse", "median_rmse_ratio_live", "median_rmse_ratio",
    "median_rmse_ratio_usable", "worst_rmse_ratio_usable",
]
#: each flag of :func:`fold_outcomes` -> the per-fold columns it reads (``went_nonfinite`` reads the sweep
#: rows' ``nonfinite`` where ``first_nonfinite_step`` is absent: :func:`prot_lib.experiments.cells.fold_rows`
#: sets one from the other)
_FLAG_INPUTS = {
    "went_nonfinite": ("first_nonfinite_step",), "loss_nonfinite": ("first_nonfinite_loss_step",),
    "lost": ("params_finite_end",), "live": ("params_finite_end",), "scored": ("params_finite_end", "final_val_rmse"),
    "dead": ("fate",), "blown_up": ("fate",), "usable": ("fate",),
}
#: each column of :func:`fate_counts` -> (the flags it counts or selects by, the further columns it reads)
_COUNT_INPUTS = {
    "n_folds": ((), ()), "n_nonfinite": (("went_nonfinite",), ()), "n_nonfinite_loss": (("loss_nonfinite",), ()),
    "n_lost": (("lost",), ()), "n_live": (("live",), ()), "n_dead": (("dead",), ()),
    "n_blown_up": (("blown_up",), ()), "n_usable": (("usable",), ()),
    "first_nonfinite_step": ((), ("first_nonfinite_step",)), "target_std": ((), ("target_std",)),
    "median_val_rmse": (("scored",), ()), "median_rmse_ratio_live": (("scored",), ("rmse_ratio",)),
    "median_rmse_ratio": (("dead",), ("rmse_ratio",)), "median_rmse_ratio_usable": (("usable",), ("rmse_ratio",)),
    "worst_rmse_ratio_usable": (("usable",), ("rmse_ratio",)),
}


def _first_step(steps: pd.DataFrame, column: str) -> Optional[int]:
    if not len(steps) or column not in steps:
        return None
    bad = ~steps[column].astype(bool)
    hit = steps.loc[bad, "step"]
    return int(hit.iloc[0]) if len(hit) else None


def _target_std(val_targets) -> float:
    y = np.asarray(val_targets, dtype=np.float64).reshape(-1)
    y = y[np.isfinite(y)]
    return float(y.std()) if len(y) else math.nan


def fold_fate(steps: pd.DataFrame, epochs: pd.DataFrame, params_finite_end: bool,
              val_targets: Iterable[float]) -> dict:
    """The fate of one fold (the :data:`FATE_COLUMNS`, as a dict).

    Args:
        steps: the fold's per-step history, ordered by ``step``, with boolean columns ``loss_finite``,
            ``grad_finite``, ``params_finite`` and integer ``step``, ``epoch``
            (:class:`prot_lib.training.history.HistoryRecorder`).
        epochs: the fold's validation epochs with ``val_loss`` and ``val_rmse`` (may be empty).
        params_finite_end: every parameter finite after training.
        val_targets: the fold's validation targets (raw units; NaN labels are ignored).

    Returns:
        dict with the keys of :data:`FATE_COLUMNS`; steps are ints or None, ``final_val_rmse``,
        ``target_std`` and ``rmse_ratio`` floats (NaN when undefined), ``fate`` one of :data:`FATES`.
    """
    firsts = {kind: _first_step(steps, f"{kind}_finite") for kind in ("loss", "grad", "params")}
    hits = [s for s in firsts.values() if s is not None]
    first = min(hits) if hits else None
    first_epoch = int(steps.loc[steps["step"] == first, "epoch"].iloc[0]) if first is not None else None
    if len(epochs):
        last = epochs.iloc[-1]
        final_rmse, final_loss = float(last["val_rmse"]), float(last["val_loss"])
    else:
        final_rmse = final_loss = math.nan
    val_finite = math.isfinite(final_rmse) and math.isfinite(final_loss)
    std = _target_std(val_targets)
    ratio = final_rmse / std if (math.isfinite(final_rmse) and std > 0) else math.nan
    if not params_finite_end or (len(epochs) and not val_finite):
        fate = "dead"
    elif first is not None:
        fate = "recovered"
    elif math.isfinite(ratio) and ratio >= BLOWN_UP_RATIO:
        fate = "blown_up"
    else:
        fate = "finite"
    return {
        "first_nonfinite_loss_step": firsts["loss"], "first_nonfinite_grad_step": firsts["grad"],
        "first_nonfinite_param_step": firsts["params"], "first_nonfinite_step": first,
        "first_nonfinite_epoch": first_epoch, "params_finite_end": bool(params_finite_end),
        "val_finite_end": bool(val_finite), "final_val_rmse": final_rmse, "target_std": std,
        "rmse_ratio": ratio, "fate": fate,
    }


def writeup_pattern(summary: pd.DataFrame) -> bool:
    """The write-up's Ishigami symptom in a k-fold summary: fold 0 never went non-finite and at least
    one later fold did (``first_nonfinite_step`` set).

    Raises:
        ValueError: the summary has no fold 0 or no later fold (the pattern is undefined).
    """
    went_nan = summary.set_index("fold")["first_nonfinite_step"].notna()
    if 0 not in went_nan.index or len(went_nan) < 2:
        raise ValueError(f"the pattern needs fold 0 and a later fold; the summary has folds {list(went_nan.index)}")
    return (not bool(went_nan.loc[0])) and bool(went_nan.drop(index=0).any())


def _require(rows: pd.DataFrame, needed: Iterable[str], what: str) -> None:
    if not isinstance(rows, pd.DataFrame):
        raise TypeError(f"expected a DataFrame of fold rows, got {type(rows).__name__}")
    missing = list(dict.fromkeys(c for c in needed if c not in rows))
    if missing:
        raise KeyError(f"fold rows lack column(s) {missing}, needed for {what}")


def _numbers(column: pd.Series) -> pd.Series:
    """float64, NaN for a missing value (None, pd.NA, NaN): sweep rows hold steps as Int64, summaries as objects."""
    return pd.to_numeric(column, errors="coerce").astype(float)


def fold_outcomes(rows: pd.DataFrame, flags: Optional[Sequence[str]] = None) -> pd.DataFrame:
    """Each fold's classes, as booleans: the one place the tables' "lost", "live" and "usable" are defined.

    Args:
        rows: one row per fold with the fate columns (:data:`FATE_COLUMNS`): a sweep's rows
            (:func:`prot_lib.experiments.cells.rows_frame`), a CSV of them, or a
            :class:`~prot_lib.training.KFoldResult`'s ``summary``.
        flags: the flags to compute (default: all of :data:`OUTCOME_FLAGS`); only their columns are read.

    Returns:
        same index as ``rows``, bool columns, in :data:`OUTCOME_FLAGS` order:

        - ``went_nonfinite``: some loss, gradient or weight was inf/NaN at some step
          (``first_nonfinite_step`` set, or in rows without it their ``nonfinite``; the write-up's "went NaN");
        - ``loss_nonfinite``: the raw training loss was inf/NaN at some step (``first_nonfinite_loss_step`` set);
        - ``lost``: some weight is non-finite at the end (``params_finite_end`` False); ``live``: not lost;
        - ``scored``: live, with a finite last validation RMSE (``final_val_rmse``): the folds whose fit
          ``fix_table`` and ``outcome_table`` take a median over (a dead fold's RMSE is left out even
          when finite, as sanitised predictions make it);
        - ``dead``, ``blown_up``: the fold's ``fate`` says so (a lost fold is always dead; a dead fold may
          be live when only its validation metric is non-finite);
        - ``usable``: neither dead nor blown up (fate ``finite`` or ``recovered``): a fit worth scoring.

    Raises:
        TypeError: ``rows`` is not a DataFrame. KeyError: a column a requested flag reads is missing,
        or an unknown flag (names them). ValueError: a ``fate`` outside :data:`FATES` (names the row).
    """
    flags = list(OUTCOME_FLAGS if flags is None else flags)
    unknown = [f for f in flags if f not in _FLAG_INPUTS]
    if unknown:
        raise KeyError(f"unknown outcome flag(s) {unknown}; valid: {', '.join(OUTCOME_FLAGS)}")
    step_column = "first_nonfinite_step" if "first_nonfinite_step" in rows or "nonfinite" not in rows else "nonfinite"
    needed = [step_column if c == "first_nonfinite_step" else c for f in flags for c in _FLAG_INPUTS[f]]
    _require(rows, needed, f"flag(s) {flags}")
    out = {}
    if "went_nonfinite" in flags:
        step = rows[step_column]
        out["went_nonfinite"] = step.notna() if step_column == "first_nonfinite_step" else step.astype(bool)
    if "loss_nonfinite" in flags:
        out["loss_nonfinite"] = rows["first_nonfinite_loss_step"].notna()
    if {"lost", "live", "scored"} & set(flags):
        live = rows["params_finite_end"].astype(bool)
        out.update(lost=~live, live=live)
        if "scored" in flags:
            out["scored"] = live & np.isfinite(_numbers(rows["final_val_rmse"]))
    if {"dead", "blown_up", "usable"} & set(flags):
        fate = rows["fate"]
        strange = fate.notna() & ~fate.isin(FATES)
        if strange.any():
            bad = strange.idxmax()
            raise ValueError(f"row {bad!r}, column 'fate': unknown fate {fate[bad]!r}; valid: {', '.join(FATES)}")
        dead, blown_up = fate == "dead", fate == "blown_up"
        out.update(dead=dead, blown_up=blown_up, usable=~dead & ~blown_up)
    return pd.DataFrame(out, index=rows.index)[[f for f in OUTCOME_FLAGS if f in flags]]


def fate_counts(rows: pd.DataFrame, by: Union[str, Sequence[str]],
                columns: Optional[Mapping[str, str]] = None) -> pd.DataFrame:
    """Per group of folds: how many went non-finite, were lost, died, blew up, and the median fit.

    The counts read :func:`fold_outcomes`; nothing is recomputed from a history.

    Args:
        rows: one row per fold, as :func:`fold_outcomes`, plus the ``by`` columns.
        by: the grouping column(s), e.g. ``"variant"`` or ``["dataset", "fix"]``; groups keep the order
            in which they first appear; rows with a missing key are dropped (pandas' ``groupby``).
        columns: optional ``{column: displayed name}``: only these columns, in this order, renamed; only
            the per-fold columns they need are read (e.g. ``n_dead`` reads ``fate`` alone).

    Returns:
        indexed by ``by`` (a MultiIndex when several), the columns of :data:`FATE_COUNT_COLUMNS`:

        - ``n_folds``: fold rows in the group; ``n_nonfinite``, ``n_nonfinite_loss``, ``n_lost``,
          ``n_live``, ``n_dead``, ``n_blown_up``, ``n_usable``: how many folds have each flag of
          :func:`fold_outcomes` (int64);
        - ``first_nonfinite_step``: the earliest ``first_nonfinite_step`` of the group (optimizer steps
          within a fold; Int64, <NA>: no fold went non-finite);
        - ``target_std``: mean over the folds of their validation targets' std (target units; the RMSE of
          predicting the mean; NaN ones skipped);
        - ``median_val_rmse``, ``median_rmse_ratio_live``: median last validation RMSE (target units) and
          RMSE / target std over the *scored* folds (live, finite RMSE; NaN ratios skipped); NaN if none;
        - ``median_rmse_ratio``: median RMSE / target std over every fold, a dead one counted as +inf
          (so a group that kills half its folds scores inf); folds with no ratio (no validation ran) are
          skipped;
        - ``median_rmse_ratio_usable``, ``worst_rmse_ratio_usable``: median and maximum RMSE / target
          std over the *usable* folds (neither dead nor blown up) that have a ratio; NaN if none.

        RMSE ratios are dimensionless: 1.0 is what predicting the mean achieves. Medians, because one
        blown-up fold would dominate a mean.

    Raises:
        TypeError, ValueError: as :func:`fold_outcomes`. KeyError: a ``by`` column or a per-fold column
        a requested output reads is missing, or an unknown name in ``columns`` (names them).
    """
    by = [by] if isinstance(by, str) else list(by)
    wanted = list(FATE_COUNT_COLUMNS if columns is None else columns)
    unknown = [c for c in wanted if c not in _COUNT_INPUTS]
    if unknown:
        raise KeyError(f"unknown fate_counts column(s) {unknown}; valid: {', '.join(FATE_COUNT_COLUMNS)}")
    _require(rows, [*by, *(c for w in wanted for c in _COUNT_INPUTS[w][1])], f"fate_counts column(s) {wanted}")
    rows = rows.reset_index(drop=True)  # the groups' rows are found by position; a repeated label must not join twice
    flags = fold_outcomes(rows, sorted({f for w in wanted for f in _COUNT_INPUTS[w][0]}))
    work = rows[by].join(flags).assign(_n=True)
    if "first_nonfinite_step" in wanted:
        work["_first_step"] = _numbers(rows["first_nonfinite_step"])
    if "target_std" in wanted:
        work["_target_std"] = _numbers(rows["target_std"])
    if "median_val_rmse" in wanted:
        work["_rmse_scored"] = _numbers(rows["final_val_rmse"]).where(flags["scored"])
    if "rmse_ratio" in rows:
        ratio = _numbers(rows["rmse_ratio"])
        for flag, name in (("scored", "_ratio_scored"), ("usable", "_ratio_usable")):
            if flag in flags:
                work[name] = ratio.where(flags[flag])
        if "dead" in flags:
            work["_ratio_all"] = ratio.where(~flags["dead"], math.inf)
    # the float statistics go through Series methods (NaN skipped), group by group, so that each value is
    # the one a plain ``series.median()`` gives; pandas' grouped kernels round some means differently
    median, mean, worst = pd.Series.median, pd.Series.mean, pd.Series.max
    recipe = {
        "n_folds": ("_n", "size"), "n_nonfinite": ("went_nonfinite", "sum"),
        "n_nonfinite_loss": ("loss_nonfinite", "sum"), "n_lost": ("lost", "sum"), "n_live": ("live", "sum"),
        "n_dead": ("dead", "sum"), "n_blown_up": ("blown_up", "sum"), "n_usable": ("usable", "sum"),
        "first_nonfinite_step": ("_first_step", "min"), "target_std": ("_target_std", mean),
        "median_val_rmse": ("_rmse_scored", median), "median_rmse_ratio_live": ("_ratio_scored", median),
        "median_rmse_ratio": ("_ratio_all", median), "median_rmse_ratio_usable": ("_ratio_usable", median),
        "worst_rmse_ratio_usable": ("_ratio_usable", worst),
    }
    out = work.groupby(by, sort=False).agg(**{w: recipe[w] for w in wanted})
    for w in wanted:
        if w.startswith("n_"):
            out[w] = out[w].astype("int64")
    if "first_nonfinite_step" in wanted:
        out["first_nonfinite_step"] = out["first_nonfinite_step"].astype("Int64")
    return out if columns is None else out.rename(columns=dict(columns))
