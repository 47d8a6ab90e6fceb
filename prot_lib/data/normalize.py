"""The honest fix for raw input scales: standardise on the training rows only.

Why it is needed: a Mamba block feeds its input through linear projections into the
step size ``delta = softplus(...)`` and into ``exp(delta * A)``. A raw Unix timestamp
(~1.7e9 s) or a pressure in Pa (~1e5) makes those pre-activations huge from the first
batch, and a NaN in the input propagates through every later token of the scan.
Gradient clipping (the write-up's fix) bounds the update, not the forward pass; this
transform removes the cause.

What :func:`standardize` does, feature by feature (roles come from
``data.meta["feature_roles"]``; a feature without a role is treated as "value"):

    "value"      (v - mean_g) / std_g, one (mean, std) per label g of
                 ``meta["token_groups"]`` (e.g. per variable id: degC, Pa and s
                 each get their own); NaN-aware, population std (ddof=0)
    "timestamp"  raw Unix seconds -> hours since the row's (chain's) earliest
                 timestamp -> standardised like a single "value" group;
                 renamed "<name>_h"
    "onehot", "indicator"
                 unchanged (already 0/1)

Then every feature listed in ``meta["nullable_features"]`` or holding any NaN gets its
NaN replaced by 0 (= the training mean, after standardisation) and a 0/1 feature
"<name>_missing" appended at the end of the feature axis (1 = the raw value was NaN),
so the model can still tell "missing" from "average".

Statistics are computed in float64 from the rows ``train_idx`` only; a group with no
finite training value gets mean 0, std 1; a constant group gets std 1.
Precision note: in float32 a Unix timestamp near 1.7e9 s is stored with a resolution of
128 s, so "hours since the first step" carries up to ~0.04 h of rounding.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Hashable, Sequence

import torch

from .indexing import as_index

__all__ = ["standardize", "fit_group_stats"]

SECONDS_PER_HOUR = 3600.0


def fit_group_stats(values: torch.Tensor, groups: Sequence[Hashable]) -> dict[Hashable, tuple[float, float]]:
    """NaN-aware (mean, std) per group label.

    Args:
        values: (n_rows, L) float64, the training rows of one feature; NaN = missing.
        groups: L labels; token positions with the same label share statistics.

    Returns {label: (mean, std)}; std is the population std (ddof=0), replaced by 1.0
    when it is 0 or undefined, mean by 0.0 when the group has no finite value.
    """
    stats: dict[Hashable, tuple[float, float]] = {}
    for label in dict.fromkeys(groups):  # first-seen order, deterministic
        cols = [pos for pos, g in enumerate(groups) if g == label]
        v = values[:, cols]
        v = v[torch.isfinite(v)]
        if v.numel() == 0:
            stats[label] = (0.0, 1.0)
            continue
        mean = float(v.mean())
        std = float(((v - mean) ** 2).mean().sqrt())
        stats[label] = (mean, std if std > 0.0 else 1.0)
    return stats


def _apply_group_stats(values: torch.Tensor, groups: Sequence[Hashable], stats) -> torch.Tensor:
    out = values.clone()
    for pos, label in enumerate(groups):
        mean, std = stats[label]
        out[:, pos] = (values[:, pos] - mean) / std
    return out


def _hours_since_first(ts: torch.Tensor) -> torch.Tensor:
    """(N, L) raw Unix seconds -> hours since each row's earliest finite timestamp."""
    first = torch.where(torch.isnan(ts), torch.full_like(ts, float("inf")), ts).amin(dim=1, keepdim=True)
    first = torch.where(torch.isinf(first), torch.full_like(first, float("nan")), first)
    return (ts - first) / SECONDS_PER_HOUR


def standardize(data: "SequenceData", train_idx: Any) -> "SequenceData":
    """Default body of :meth:`SequenceData.normalized`; see the module docstring.

    Args:
        data: raw dataset, x (N, L, F) float32 with NaN for missing values.
        train_idx: training rows (ints, bool mask, slice, array or tensor).

    Returns a new SequenceData: x (N, L, F + n_missing_features) float32 without NaN,
    feature names as described above, y unchanged, ``meta["normalization"]`` holding
    the fitted statistics and ``meta["normalized"] = True``.

    Raises ValueError: ``train_idx`` selects no row.
    """
    rows = as_index(train_idx, len(data))
    if rows.numel() == 0:
        raise ValueError(f"{data.name}: train_idx selects no row; cannot fit normalisation statistics")
    n, length, _ = data.shape
    roles: dict[str, str] = data.meta.get("feature_roles", {})
    groups = list(data.meta.get("token_groups") or ["all"] * length)
    if len(groups) != length:
        raise ValueError(f"{data.name}: meta['token_groups'] has {len(groups)} labels for L={length}")
    raw = data.x.double()
    missing = torch.isnan(raw)
    nullable = set(data.meta.get("nullable_features", []))

    columns, names, new_roles = [], [], {}
    indicator_cols, indicator_names = [], []
    fitted: dict[str, Any] = {"train_rows": int(rows.numel())}
    for f, name in enumerate(data.feature_names):
        role = roles.get(name, "value")
        col = raw[:, :, f]
        if role == "value":
            stats = fit_group_stats(col[rows], groups)
            col = _apply_group_stats(col, groups, stats)
            fitted[name] = {str(k): {"mean": m, "std": s} for k, (m, s) in stats.items()}
        elif role == "timestamp":
            hours = _hours_since_first(col)
            stats = fit_group_stats(hours[rows], ["all"] * length)
            col = _apply_group_stats(hours, ["all"] * length, stats)
            mean, std = stats["all"]
            name = f"{name}_h"
            role = "value"
            fitted[name] = {"mean_h": mean, "std_h": std, "origin": "row's first timestamp"}
        feature_missing = missing[:, :, f]
        columns.append(torch.where(feature_missing, torch.zeros_like(col), col))
        names.append(name)
        new_roles[name] = role
        if data.feature_names[f] in nullable or bool(feature_missing.any()):
            indicator_cols.append(feature_missing.double())
            indicator_names.append(f"{name}_missing")

    for name in indicator_names:
        new_roles[name] = "indicator"
    x = torch.stack(columns + indicator_cols, dim=-1).float()
    meta = dict(data.meta)
    meta.update(
        feature_roles=new_roles,
        nullable_features=[],
        normalization=fitted,
        normalized=True,
    )
    return replace(data, x=x, feature_names=names + indicator_names, meta=meta)
