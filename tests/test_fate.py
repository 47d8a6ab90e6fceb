"""The one definition of a fold's fate (prot_lib.training.fate), on hand-made histories."""
import math

import numpy as np
import pandas as pd
import pytest

from prot_lib.training.fate import BLOWN_UP_RATIO, FATE_COLUMNS, fold_fate, writeup_pattern


def steps(loss=(), grad=(), params=(), n=6):
    """A history of n steps; the given step numbers are non-finite in that column."""
    return pd.DataFrame({
        "step": range(n), "epoch": [s // 3 for s in range(n)],
        "loss_finite": [s not in loss for s in range(n)],
        "grad_finite": [s not in grad for s in range(n)],
        "params_finite": [s not in params for s in range(n)],
    })


def epochs(rmse=1.0, loss=1.0):
    return pd.DataFrame({"epoch": [0, 1], "val_loss": [2.0, loss], "val_rmse": [3.0, rmse]})


Y = np.array([0.0, 2.0, 4.0, np.nan])  # std (ddof=0, NaN ignored) = sqrt(8/3)
STD = math.sqrt(8 / 3)


def test_a_clean_fold_is_finite_and_its_rmse_ratio_is_against_the_target_std():
    f = fold_fate(steps(), epochs(rmse=0.5), True, Y)
    assert list(f) == FATE_COLUMNS
    assert f["fate"] == "finite"
    assert f["first_nonfinite_step"] is None and f["first_nonfinite_epoch"] is None
    assert f["target_std"] == pytest.approx(STD)
    assert f["rmse_ratio"] == pytest.approx(0.5 / STD)


def test_the_first_nonfinite_step_is_the_earliest_of_loss_grad_and_params():
    f = fold_fate(steps(loss=(4,), grad=(3, 4), params=(4, 5)), epochs(rmse=math.nan, loss=math.nan), False, Y)
    assert (f["first_nonfinite_loss_step"], f["first_nonfinite_grad_step"], f["first_nonfinite_param_step"]) == (4, 3, 4)
    assert f["first_nonfinite_step"] == 3 and f["first_nonfinite_epoch"] == 1
    assert f["fate"] == "dead" and not f["params_finite_end"] and not f["val_finite_end"]


def test_finite_weights_with_a_nonfinite_validation_metric_are_dead():
    f = fold_fate(steps(loss=(2,)), epochs(rmse=math.inf), True, Y)
    assert f["fate"] == "dead"


def test_a_skipped_nonfinite_step_that_ends_finite_is_recovered():
    f = fold_fate(steps(grad=(2,)), epochs(rmse=0.9), True, Y)
    assert f["fate"] == "recovered" and f["first_nonfinite_step"] == 2


def test_a_finite_fold_far_worse_than_the_mean_is_blown_up():
    just_below = fold_fate(steps(), epochs(rmse=0.99 * BLOWN_UP_RATIO * STD), True, Y)
    above = fold_fate(steps(), epochs(rmse=1.01 * BLOWN_UP_RATIO * STD), True, Y)
    assert just_below["fate"] == "finite" and above["fate"] == "blown_up"


def test_writeup_pattern():
    def summary(firsts):
        return pd.DataFrame({"fold": range(len(firsts)), "first_nonfinite_step": pd.array(firsts, dtype="Int64")})

    assert writeup_pattern(summary([None, None, 186, None, None]))
    assert not writeup_pattern(summary([12, None, 186, None, None]))  # fold 0 went NaN too
    assert not writeup_pattern(summary([None] * 5))
    with pytest.raises(ValueError, match="fold 0"):
        writeup_pattern(summary([None]))
