"""Missing labels: masking them out of the loss versus ``torch.nan_to_num`` on the targets.

``nan_to_num`` makes a NaN loss disappear by inventing a label: every missing target becomes 0. The loss
is then finite and *wrong*: it pulls every prediction toward 0 in proportion to the share of missing
labels. For the loss-optimal constant the effect is exact: with a fraction q of labels missing and
observed labels of mean mu, minimising the MSE over filled labels gives (1 - q) mu instead of mu, a
bias of -q mu. Masking (``training.mask_missing_targets: true``: the loss averages over observed
labels only) has no such bias; it only trains on fewer labels.

:func:`compare_target_handling` measures both on a dataset with a linear least-squares probe (fast and
deterministic, so the comparison is not hidden behind training noise), optionally after hiding more
labels at random; :func:`prediction_bias` measures a trained model on held-out observed rows.
How the input side is masked (zero-fill + indicator = a mask-aware embedding) is described in
:mod:`prot_lib.data.guards`.
"""
from __future__ import annotations

import math
from dataclasses import replace
from typing import Any, Optional, Sequence

import numpy as np
import pandas as pd
import torch

from ..data.base import SequenceData, as_index

HANDLINGS = ("mask", "nan_to_num")


def _probe_features(x: torch.Tensor) -> np.ndarray:
    """(N, L, F) normalised inputs -> (N, 2F + 1): per-feature mean and std over tokens, plus a bias."""
    x = x.double()
    return torch.cat([x.mean(1), x.std(1, unbiased=False), torch.ones(x.shape[0], 1, dtype=x.dtype)], 1).numpy()


def _fit_predict(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, ridge: float = 1e-3) -> np.ndarray:
    a = train_x.T @ train_x + ridge * np.eye(train_x.shape[1])
    w = np.linalg.solve(a, train_x.T @ train_y)
    return test_x @ w


def compare_target_handling(data: SequenceData, train_idx: Any, val_idx: Any,
                            missing_fractions: Sequence[Optional[float]] = (None, 0.2, 0.5),
                            seed: int = 0) -> pd.DataFrame:
    """Fit the same linear probe with missing training labels masked or set to 0 by ``nan_to_num``.

    Args:
        data: raw dataset; inputs are normalised on ``train_idx`` (:meth:`SequenceData.normalized`).
        train_idx, val_idx: training and held-out rows.
        missing_fractions: share of *training* labels missing; None = as the data holds them, a number q
            hides further observed labels at random until a fraction q is missing.
        seed: for the random hiding.

    Returns:
        One row per (missing fraction, handling): ``missing_fraction`` (actual share of training labels
        missing), ``handling`` ("mask" | "nan_to_num"), ``labels_in_loss``, ``invented_labels`` (zeros
        put in by nan_to_num), ``bias`` (mean prediction - mean label on the held-out rows whose label
        is observed, target units), ``expected_bias_constant`` (-q * mean observed training label: the
        bias of the loss-optimal constant under nan_to_num; 0 for mask), ``val_rmse`` (observed held-out
        rows), ``bias_vs_mask`` (bias minus the mask row's bias at the same fraction: what nan_to_num
        adds; compare with ``expected_bias_constant``).

    Raises:
        ValueError: no held-out row has an observed label.
    """
    train = as_index(train_idx, len(data)).numpy()
    val = as_index(val_idx, len(data)).numpy()
    feats = _probe_features(data.normalized(train).x)
    y = data.y.double().numpy()
    val_obs = val[np.isfinite(y[val])]
    if val_obs.size == 0:
        raise ValueError("no held-out row has an observed label")
    rng = np.random.default_rng(seed)
    rows = []
    for q in missing_fractions:
        y_train = y[train].copy()
        if q is not None:
            observed = np.flatnonzero(np.isfinite(y_train))
            n_hide = max(0, int(round(q * len(y_train))) - int((~np.isfinite(y_train)).sum()))
            y_train[rng.choice(observed, size=min(n_hide, observed.size), replace=False)] = np.nan
        missing = ~np.isfinite(y_train)
        q_actual = float(missing.mean())
        mu_obs = float(y_train[~missing].mean())
        for handling in HANDLINGS:
            if handling == "mask":
                px, py = feats[train][~missing], y_train[~missing]
            else:
                px, py = feats[train], np.nan_to_num(y_train, nan=0.0)
            pred = _fit_predict(px, py, feats[val_obs])
            err = pred - y[val_obs]
            rows.append({
                "missing_fraction": q_actual, "handling": handling, "labels_in_loss": int(len(py)),
                "invented_labels": int(missing.sum()) if handling == "nan_to_num" else 0,
                "bias": float(err.mean()),
                "expected_bias_constant": -q_actual * mu_obs if handling == "nan_to_num" else 0.0,
                "val_rmse": float(np.sqrt((err ** 2).mean())),
            })
    out = pd.DataFrame(rows)
    mask_bias = out[out["handling"] == "mask"].set_index("missing_fraction")["bias"]
    out["bias_vs_mask"] = out["bias"] - out["missing_fraction"].map(mask_bias)
    return out


def with_targets_nan_to_num(data: SequenceData, fill: float = 0.0) -> SequenceData:
    """A copy of ``data`` whose missing labels are ``fill`` (what ``torch.nan_to_num(y)`` does), for
    training the alternative for real: ``run_kfold(cfg, data=with_targets_nan_to_num(raw))``."""
    return replace(data, y=torch.nan_to_num(data.y, nan=fill))


@torch.no_grad()
def prediction_bias(model: torch.nn.Module, data: SequenceData, rows: Any,
                    truth: Optional[torch.Tensor] = None) -> dict:
    """Mean error and RMSE of ``model`` (x -> (N,) predictions) on ``rows`` whose true label is observed.

    Args:
        model: e.g. ``result.models[0]`` (a NaNStudyModule) in eval mode.
        data: the inputs the model was trained on (normalised the same way).
        rows: held-out rows.
        truth: (N,) labels to score against (default ``data.y``); pass the raw labels when ``data.y``
            was filled by :func:`with_targets_nan_to_num`.

    Returns:
        {"n": rows scored, "bias": mean(pred - y), "rmse": ...} in target units (NaN when n = 0).
    """
    idx = as_index(rows, len(data))
    y = (data.y if truth is None else truth)[idx].double()
    keep = torch.isfinite(y)
    was_training = model.training
    model.eval()
    pred = model(data.x[idx][keep]).double()
    model.train(was_training)
    err = pred - y[keep]
    n = int(keep.sum())
    return {"n": n, "bias": float(err.mean()) if n else math.nan,
            "rmse": float(err.pow(2).mean().sqrt()) if n else math.nan}
