"""Seed rates: how often does a configuration go NaN, fold by fold, over many seeds?

Every (seed, fold) is an independent cell (a fold re-seeds with ``seed + fold`` and builds a fresh
model, so its fate does not depend on the other folds): :func:`seed_sweep` runs them through the
engine, and :func:`seed_rates` reads the rows. Every rate reads each fold's fate
(:mod:`prot_lib.training.fate`): a fold "went non-finite" when its ``first_nonfinite_step`` is set (a
loss, a gradient or a weight was inf/NaN at some step), it is "dead" when its fate is. The write-up's
pattern is :func:`prot_lib.training.fate.writeup_pattern` on each seed's folds.

Note: ``scripts/seed_sweep.py`` before this module counted a fold non-finite only for its loss or its
weights, not for a gradient norm alone; the fate counts all three (a float32 total gradient norm can
overflow to inf while every gradient element is finite: such a fold is "recovered", not "dead").
"""
from __future__ import annotations

import math
import statistics
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import pandas as pd

from ..training.fate import FATES, writeup_pattern
from .cells import BaseLike, grid_cells
from .engine import run_cells

__all__ = ["seed_sweep", "seed_rates", "p_as_many_or_more"]


def seed_sweep(base: BaseLike, seeds: Iterable[int], folds: Optional[Sequence[int]] = None, fix: Optional[str] = None,
               overrides: Optional[Mapping[str, Any]] = None, max_steps: int = -1, **engine: Any) -> pd.DataFrame:
    """Train every (seed, fold) of ``base`` as its own cell; returns the rows.

    Args:
        base: a dataset name (its shipped reproduction) or a ``RunConfig``.
        seeds: ``training.seed`` values.
        folds: fold indices (None: all ``k_fold``).
        fix: a fix overlay applied on top of ``base``.
        overrides: dotted config overrides (``{"training.lr": 0.02}``).
        max_steps: optimizer steps per fold (-1: the config's epochs).
        **engine: passed to :func:`~prot_lib.experiments.engine.run_cells`.
    """
    cells = grid_cells(base, fixes=(fix,), seeds=list(seeds), folds=folds, split_folds=True, max_steps=max_steps,
                       overrides=overrides)
    engine.setdefault("desc", "seed sweep")
    return run_cells(cells, **engine)


def _frac(flags: Iterable[bool]) -> Dict[str, Any]:
    flags = [bool(x) for x in flags]
    return {"k": sum(flags), "n": len(flags), "rate": (sum(flags) / len(flags)) if flags else None}


def seed_rates(rows: pd.DataFrame) -> Tuple[pd.DataFrame, Dict[str, Any]]:
    """Per-seed findings and rates of a seed sweep's rows (one configuration).

    Returns:
        ``(per_seed, rates)``. ``per_seed``: one row per seed: ``nonfinite_folds``, ``dead_folds``,
        ``first_nonfinite_step`` ({fold: step}), ``fold0_nonfinite``, ``pattern`` (the write-up's
        pattern; None without fold 0 and a later fold), ``mean_val_rmse_finite_folds``. ``rates`` (a
        JSON-ready dict; each rate as ``{"k", "n", "rate"}``): ``p_fold_nonfinite``,
        ``p_fold_nonfinite_loss``, ``p_fold_dead``, ``p_fold0_nonfinite``, ``p_later_fold_nonfinite``,
        ``any_nonfinite_rate`` (over seeds), ``pattern_rate`` (over seeds, when defined), ``fates``
        (folds per fate), ``first_nonfinite_steps`` (sorted), ``mean_val_rmse_finite_folds`` and
        ``median_val_rmse_finite_folds`` (last val RMSE of the folds that never went non-finite, target
        units), ``n_finite_folds``.
    """
    per_seed: List[Dict[str, Any]] = []
    for seed, g in rows.sort_values(["seed", "fold"]).groupby("seed", sort=True):
        folds = g["fold"].tolist()
        finite = g[~g["nonfinite"] & g["final_val_rmse"].notna()]
        per_seed.append({
            "seed": int(seed),
            "nonfinite_folds": g.loc[g["nonfinite"], "fold"].astype(int).tolist(),
            "dead_folds": g.loc[g["fate"] == "dead", "fold"].astype(int).tolist(),
            "first_nonfinite_step": {int(f): int(s) for f, s in zip(g["fold"], g["first_nonfinite_step"]) if pd.notna(s)},
            "fold0_nonfinite": bool(g.loc[g["fold"] == 0, "nonfinite"].iloc[0]) if 0 in folds else None,
            "pattern": writeup_pattern(g[["fold", "first_nonfinite_step"]]) if 0 in folds and len(folds) > 1 else None,
            "mean_val_rmse_finite_folds": float(finite["final_val_rmse"].mean()) if len(finite) else None,
        })
    ps = pd.DataFrame(per_seed)
    rmse = rows.loc[~rows["nonfinite"] & rows["final_val_rmse"].notna(), "final_val_rmse"].tolist()
    rates: Dict[str, Any] = {
        "p_fold_nonfinite": _frac(rows["nonfinite"]),
        "p_fold_nonfinite_loss": _frac(rows["first_nonfinite_loss_step"].notna()),
        "p_fold_dead": _frac(rows["fate"] == "dead"),
        "p_fold0_nonfinite": _frac(rows.loc[rows["fold"] == 0, "nonfinite"]),
        "p_later_fold_nonfinite": _frac(rows.loc[rows["fold"] >= 1, "nonfinite"]),
        "any_nonfinite_rate": _frac(len(f) > 0 for f in ps["nonfinite_folds"]) if len(ps) else _frac([]),
        "fates": {fate: int((rows["fate"] == fate).sum()) for fate in FATES},
        "first_nonfinite_steps": sorted(int(s) for s in rows["first_nonfinite_step"].dropna()),
        "mean_val_rmse_finite_folds": statistics.fmean(rmse) if rmse else None,
        "median_val_rmse_finite_folds": statistics.median(rmse) if rmse else None,
        "n_finite_folds": len(rmse),
    }
    if len(ps) and ps["pattern"].notna().all():
        rates["pattern_rate"] = _frac(ps["pattern"])
    return ps, rates


def p_as_many_or_more(k: int, k_ref: int, n: int, n_ref: Optional[int] = None) -> float:
    """How surprising is it that a variant lost ``k`` of ``n`` folds where a reference lost ``k_ref`` of
    ``n_ref``, if the variant changed nothing? One-sided Fisher's exact test.

    Under "no change" every fold of both groups is one draw from the same rate, so given the
    ``k + k_ref`` folds lost in all, the variant's count is hypergeometric; the p-value is its upper
    tail, P(X >= k) with X ~ Hypergeometric(N = n + n_ref, K = k + k_ref, draws = n) (Fisher 1922; the
    ``alternative="greater"`` p-value of ``scipy.stats.fisher_exact`` on [[k, n - k], [k_ref, n_ref - k_ref]]).

    Args:
        k, n: folds lost and run by the variant.
        k_ref, n_ref: folds lost and run by the reference (``n_ref`` default: ``n``).

    Returns:
        the p-value in (0, 1]: small means the variant lost more folds than chance alone explains.

    Raises:
        ValueError: a count below 0 or above its number of folds.
    """
    n_ref = n if n_ref is None else n_ref
    if not (0 <= k <= n and 0 <= k_ref <= n_ref):
        raise ValueError(f"need 0 <= k <= n and 0 <= k_ref <= n_ref, got k={k}, n={n}, k_ref={k_ref}, n_ref={n_ref}")
    total, lost = n + n_ref, k + k_ref
    tail = sum(math.comb(lost, i) * math.comb(total - lost, n - i) for i in range(k, min(lost, n) + 1))
    return tail / math.comb(total, n)
