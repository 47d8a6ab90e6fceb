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

The write-up's pattern on Ishigami ("the first fold trained, then a later fold went NaN") is
:func:`writeup_pattern`: fold 0 has no non-finite step and some later fold has one.
"""
from __future__ import annotations

import math
from typing import Iterable, Optional

import numpy as np
import pandas as pd

__all__ = ["FATES", "BLOWN_UP_RATIO", "FATE_COLUMNS", "fold_fate", "writeup_pattern"]

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
