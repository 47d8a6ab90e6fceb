"""Chapter 8's evidence: every fix on every dataset, a stability map over lr x clipping, and the
configuration the book recommends.

- :func:`fix_matrix` trains ``reproduction_config(dataset, fix)`` for each fix (the same configs and
  :func:`~prot_lib.training.kfold.run_kfold` as chapters 1-7, so ``PROT_LIB_CACHE`` reads their runs
  back) and tabulates, per (dataset, fix), how many folds hit a non-finite loss and how many ended with
  non-finite weights.
- :func:`stability_map` trains short folds over (learning rate x clip setting) through
  :func:`prot_lib.training.quick.quick_config`, the configs of chapter 3's clip sweep and of the clip
  explorer, so their runs are shared too.
- :func:`recommended_config` is the configuration the chapter argues for, one key per reason.

A fold's fate here is what its history says: ``raw_loss`` (before the write-up's sanitisation) for
"non-finite loss", ``train_loss`` (what was back-propagated and logged) for "the logger saw it",
``params_finite_end`` for "the model is dead".
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import pandas as pd

from .config import FIXES, RunConfig, _undot, reproduction_config
from .kfold import KFoldResult, run_kfold
from .quick import _quick_run, run_outcome

#: one row per (dataset, fix) in :attr:`FixMatrix.table`
FIX_TABLE_COLUMNS = [
    "dataset", "fix", "n_folds", "folds_nonfinite_loss", "folds_nonfinite_logged_loss", "folds_nan_params_end",
    "frac_nan_params_end", "first_nonfinite_step", "n_live_folds", "mean_val_rmse", "target_std",
    "rmse_over_std", "same_config_as",
]
#: one row per (dataset, fix, fold) in :attr:`FixMatrix.per_fold`
FIX_FOLD_COLUMNS = [
    "dataset", "fix", "fold", "n_steps", "loss_nonfinite", "logged_loss_nonfinite", "params_finite_end",
    "first_nonfinite_loss_step", "first_nonfinite_step", "final_val_rmse",
]
#: one row per (dataset, lr, setting, fold) of :func:`stability_map`
MAP_COLUMNS = ["dataset", "fix", "lr", "setting", "fold", "n_steps", "nonfinite", "first_nan_step",
               "final_loss", "max_grad_norm", "final_val_rmse"]


# --------------------------------------------------------------------------------------------- helpers
def target_std(dataset: str) -> float:
    """Standard deviation of the dataset's targets (NaN targets ignored), in target units: the val RMSE
    of predicting a constant (the mean), the bar a model must beat to have learnt anything."""
    from ..data import load_dataset

    y = load_dataset(dataset).y.double()
    y = y[~y.isnan()]
    return float(y.std())


def same_run(a: RunConfig, b: RunConfig) -> bool:
    """True when two configs train the same thing: equal except ``name`` and ``description``."""
    da, db = a.to_dict(), b.to_dict()
    for d in (da, db):
        d.pop("name"), d.pop("description")
    return da == db


def subset_result(res: KFoldResult, folds: Sequence[int]) -> KFoldResult:
    """The folds ``folds`` of ``res`` as a :class:`KFoldResult` of their own.

    Folds are independent (each re-seeds with ``seed + fold`` and builds a fresh model), so fold k of
    a 5-fold run is the run of fold k alone: this reuses a bigger run instead of training again.

    Raises:
        KeyError: a fold that ``res`` did not train.
    """
    folds = [int(f) for f in folds]
    have = [int(f) for f in res.summary["fold"]]
    missing = sorted(set(folds) - set(have))
    if missing:
        raise KeyError(f"folds {missing} not in the run (it trained folds {have})")

    def pick(df: pd.DataFrame) -> pd.DataFrame:
        if df is None or df.empty or "fold" not in df:
            return df
        return df[df["fold"].isin(folds)].reset_index(drop=True)

    models = [m for f, m in zip(have, res.models) if f in folds] if len(res.models) == len(have) else []
    prefixes = tuple(f"fold {f}:" for f in folds)
    return KFoldResult(config=res.config, history=pick(res.history), epochs=pick(res.epochs),
                       summary=pick(res.summary), param_grad_norms=pick(res.param_grad_norms),
                       warnings=[w for w in res.warnings if w.startswith(prefixes)], run_dir=res.run_dir,
                       models=models)


def _fold_rows(dataset: str, fix: str, res: KFoldResult) -> List[dict]:
    rows = []
    for _, s in res.summary.iterrows():
        fold = int(s["fold"])
        h = res.history[res.history["fold"] == fold]
        steps = [s[k] for k in ("first_nonfinite_loss_step", "first_nonfinite_grad_step",
                                "first_nonfinite_param_step") if not pd.isna(s[k])]
        rows.append({
            "dataset": dataset, "fix": fix, "fold": fold, "n_steps": int(s["n_steps"]),
            "loss_nonfinite": not pd.isna(s["first_nonfinite_loss_step"]),
            "logged_loss_nonfinite": bool((~np.isfinite(h["train_loss"].to_numpy(dtype=float))).any()),
            "params_finite_end": bool(s["params_finite_end"]),
            "first_nonfinite_loss_step": None if pd.isna(s["first_nonfinite_loss_step"]) else int(s["first_nonfinite_loss_step"]),
            "first_nonfinite_step": int(min(steps)) if steps else None,
            "final_val_rmse": float(s["final_val_rmse"]),
        })
    return rows


# ------------------------------------------------------------------------------------------ fix matrix
@dataclass
class FixMatrix:
    """What :func:`fix_matrix` returns.

    Attributes:
        table: one row per (dataset, fix), :data:`FIX_TABLE_COLUMNS`:
            ``folds_nonfinite_loss`` (folds whose raw loss was inf/NaN at some step),
            ``folds_nonfinite_logged_loss`` (folds whose back-propagated, logged ``train_loss`` was
            inf/NaN: what a dashboard shows), ``folds_nan_params_end`` (folds that ended with a non-finite
            weight: a dead model) and its fraction, ``first_nonfinite_step`` (earliest optimizer step,
            within its fold, with a non-finite loss, gradient norm or weight; NA if none),
            ``n_live_folds`` (folds whose weights are all finite at the end), ``mean_val_rmse`` (mean
            last-epoch val RMSE, target units, over the live folds that ran a validation epoch; NaN if
            none: a dead fold's RMSE is left out even when finite, as sanitised predictions make it),
            ``target_std`` (:func:`target_std`), ``rmse_over_std`` (< 1: better than predicting the
            mean), ``same_config_as`` (another fix whose config is identical, whose run was reused).
        per_fold: one row per (dataset, fix, fold), :data:`FIX_FOLD_COLUMNS`.
        runs: {(dataset, fix): KFoldResult} restricted to the requested folds.
    """

    table: pd.DataFrame
    per_fold: pd.DataFrame
    runs: Dict[Tuple[str, str], KFoldResult] = field(repr=False)

    def row(self, dataset: str, fix: str) -> pd.Series:
        """The table row of (dataset, fix)."""
        t = self.table
        return t[(t["dataset"] == dataset) & (t["fix"] == fix)].iloc[0]

    def pivot(self, value: str) -> pd.DataFrame:
        """``value`` as a fix x dataset table (fixes in the order run), e.g. ``frac_nan_params_end``."""
        p = self.table.pivot(index="fix", columns="dataset", values=value)
        fixes = list(dict.fromkeys(self.table["fix"]))
        datasets = list(dict.fromkeys(self.table["dataset"]))
        return p.loc[fixes, datasets].astype(float)


def fix_matrix(folds: Mapping[str, Optional[Sequence[int]]], fixes: Sequence[str] = FIXES,
               known: Optional[Mapping[Tuple[str, str], KFoldResult]] = None, max_steps: int = -1,
               run_dir: Union[str, Path, None] = None) -> FixMatrix:
    """Train every fix of ``fixes`` on every dataset of ``folds`` and tabulate the outcome.

    Args:
        folds: {dataset: fold indices, or None for all ``k_fold`` folds}, e.g. ``{"ishigami": [3],
            "dyconex": None}``.
        fixes: names from :data:`~prot_lib.training.config.FIXES`.
        known: runs already in hand, {(dataset, fix): KFoldResult} of the same config with (at least)
            the requested folds; they are sliced with :func:`subset_result`, not retrained.
        max_steps: optimizer steps per fold (-1: the config's ``max_epochs``); part of the cache key.
        run_dir: folder for the CSV logs, one subfolder per config name (default: ``run_kfold``'s
            ``runs/<name>``). A private folder per execution avoids appending to an older run's
            ``metrics.csv``, which Lightning's CSVLogger cannot do when the columns differ.

    A fix whose config equals one already run for the same dataset (e.g. ``lower-lr`` on Dyconex, whose
    shipped lr already is the write-up's 1e-4) reuses that run and names it in ``same_config_as``.

    Returns:
        :class:`FixMatrix`.
    """
    known = dict(known or {})
    runs: Dict[Tuple[str, str], KFoldResult] = {}
    per_fold: List[dict] = []
    table: List[dict] = []
    for dataset, fold_sel in folds.items():
        std = target_std(dataset)
        done: List[Tuple[str, RunConfig]] = []
        for fix in fixes:
            cfg = reproduction_config(dataset, fix)
            fold_list = list(range(cfg.training.k_fold)) if fold_sel is None else [int(f) for f in fold_sel]
            twin = next((f for f, c in done if same_run(c, cfg)), None)
            if twin is not None:
                res = runs[(dataset, twin)]
            elif (dataset, fix) in known:
                res = subset_result(known[(dataset, fix)], fold_list)
            else:
                res = run_kfold(cfg, folds=fold_list, max_steps=max_steps, keep_models=False, progress=False,
                                run_dir=Path(run_dir) / cfg.name if run_dir is not None else None)
            runs[(dataset, fix)] = res
            done.append((fix, cfg))
            rows = _fold_rows(dataset, fix, res)
            per_fold.extend(rows)
            f = pd.DataFrame(rows)
            live = f["params_finite_end"]
            scored = live & np.isfinite(f["final_val_rmse"])
            firsts = f["first_nonfinite_step"].dropna()
            mean_rmse = float(f.loc[scored, "final_val_rmse"].mean()) if scored.any() else math.nan
            table.append({
                "dataset": dataset, "fix": fix, "n_folds": len(f),
                "folds_nonfinite_loss": int(f["loss_nonfinite"].sum()),
                "folds_nonfinite_logged_loss": int(f["logged_loss_nonfinite"].sum()),
                "folds_nan_params_end": int((~f["params_finite_end"]).sum()),
                "frac_nan_params_end": float((~f["params_finite_end"]).mean()),
                "first_nonfinite_step": int(firsts.min()) if len(firsts) else None,
                "n_live_folds": int(live.sum()), "mean_val_rmse": mean_rmse, "target_std": std,
                "rmse_over_std": mean_rmse / std, "same_config_as": twin,
            })
    t = pd.DataFrame(table, columns=FIX_TABLE_COLUMNS)
    t["first_nonfinite_step"] = t["first_nonfinite_step"].astype("Int64")
    pf = pd.DataFrame(per_fold, columns=FIX_FOLD_COLUMNS)
    for col in ("first_nonfinite_loss_step", "first_nonfinite_step"):
        pf[col] = pf[col].astype("Int64")
    return FixMatrix(table=t, per_fold=pf, runs=runs)


# ------------------------------------------------------------------------------------- stability map
def _setting_label(clip: Optional[float]) -> str:
    return "off" if not clip else f"clip {clip:g}"


def stability_map(dataset: str, lrs: Sequence[float], clips: Sequence[Optional[float]] = (None, 0.1, 1.0, 10.0),
                  algorithms: Iterable[str] = (), folds: Sequence[int] = (0,), max_steps: int = 100,
                  fix: str = "none", seed: int = 0) -> pd.DataFrame:
    """Train ``folds`` of ``reproduction_config(dataset, fix)`` for every (lr, clip setting) cell.

    Args:
        lrs: ``training.lr`` values (AdamW, per optimizer step).
        clips: ``gradient_clip_val`` values under ``gradient_clip_algorithm: norm``, applied by
            ``Trainer(gradient_clip_val=...)``; None or 0 is clipping off (setting "off"), c is "clip c".
        algorithms: adaptive algorithms added as settings ("autoclip", "zclip"; their papers' defaults,
            :mod:`prot_lib.training.clipping`), when ``training.gradient_clip_algorithm`` offers them.
        folds, max_steps, fix, seed: as :func:`prot_lib.training.quick.quick_train` (``max_steps`` -1:
            the config's ``max_epochs``; a positive one raises ``max_epochs`` when needed).

    The runs are :func:`~prot_lib.training.quick.quick_config` configs, the ones of chapter 3's clip
    sweep and the clip explorer: the same cell asked twice is read from ``PROT_LIB_CACHE``.

    Returns:
        one row per (lr, setting, fold), :data:`MAP_COLUMNS`: ``nonfinite`` (a non-finite loss, gradient
        norm or weight at some step), ``first_nan_step`` (NaN if none), ``final_loss`` (mean raw loss of
        the last 10 steps), ``max_grad_norm`` (largest finite pre-clip norm), ``final_val_rmse`` (target
        units; NaN when the weights died).
    """
    settings: List[Tuple[str, Optional[float], dict]] = [(_setting_label(c), c, {}) for c in clips]
    settings += [(a, None, {"training.gradient_clip_algorithm": a}) for a in algorithms]
    rows = []
    for lr in lrs:
        for label, clip, overrides in settings:
            res = _quick_run(dataset, lr, clip, max_steps, seed, [int(f) for f in folds], fix, overrides or None)
            for fold, h in res.history.groupby("fold"):
                out = run_outcome(h)
                s = res.fold_summary(int(fold))
                rmse = s["final_val_rmse"] if s["params_finite_end"] and s["final_val_rmse"] is not None else math.nan
                rows.append({"dataset": dataset, "fix": fix, "lr": float(lr), "setting": label, "fold": int(fold),
                             "n_steps": out["n_steps"], "nonfinite": out["nonfinite"],
                             "first_nan_step": math.nan if out["first_nan_step"] is None else out["first_nan_step"],
                             "final_loss": out["final_loss"], "max_grad_norm": out["max_grad_norm"],
                             "final_val_rmse": rmse})
    return pd.DataFrame(rows, columns=MAP_COLUMNS)


def stability_pivot(df: pd.DataFrame, value: str = "nonfinite") -> pd.DataFrame:
    """Mean of ``value`` over folds as an lr x setting table (lr ascending, settings in run order);
    for ``nonfinite``: the fraction of folds that went non-finite."""
    p = df.groupby(["lr", "setting"], sort=False)[value].mean().unstack("setting")
    return p.loc[sorted(p.index), list(dict.fromkeys(df["setting"]))].astype(float)


def stability_edge(pivot: pd.DataFrame) -> pd.Series:
    """Per setting (column of :func:`stability_pivot`): the largest lr up to which every cell, that lr
    and all smaller ones, stayed finite in every fold; NaN if even the smallest lr failed."""
    edge = {}
    for col in pivot.columns:
        ok = pivot[col].to_numpy() == 0.0
        n = int(np.argmin(ok)) if not ok.all() else len(ok)  # length of the all-finite prefix
        edge[col] = float(pivot.index[n - 1]) if n else math.nan
    return pd.Series(edge, name="largest stable lr")


def describe_stability(pivot: pd.DataFrame, dataset: str) -> str:
    """The finding of a stability map in one line, e.g. "ishigami: finite up to lr 0.01 without
    clipping; clip 1 moves it to lr 0.02; every setting fails at lr 0.05".

    The edge of a setting is :func:`stability_edge`; a clip setting "moves" the edge when its edge is
    above the one of "off", "lowers" it when every clip setting's edge is below."""
    if (pivot == 0).all().all():
        return f"{dataset}: every cell stays finite"
    edge = stability_edge(pivot)
    fmt = lambda v: "no lr" if math.isnan(v) else f"lr {v:g}"  # noqa: E731
    base = edge.get("off", math.nan)
    parts = [f"{dataset}: finite up to {fmt(base)} without clipping" if "off" in edge else dataset]
    others = edge.drop("off", errors="ignore").fillna(0.0)  # a setting that fails everywhere: edge 0
    if len(others) and "off" in edge:
        best, b = others.idxmax(), others.max()
        base0 = 0.0 if math.isnan(base) else base
        if b > base0:
            parts.append(f"{best} moves it to {fmt(b)}")
        elif b == base0:
            parts.append("no clip setting moves it")
        else:
            parts.append("every clip setting lowers it" + (f" (best: {best}, {fmt(b)})" if b > 0 else ""))
    top = pivot.index.max()
    if (pivot.loc[top] > 0).all():
        parts.append(f"every setting fails at lr {top:g}")
    return "; ".join(parts)


# ------------------------------------------------------------------------------ recommended config
#: The configuration chapter 8 recommends, as dotted overrides of the shipped reproduction; each key
#: with the chapter that measured why.
RECOMMENDED: Dict[str, object] = {
    "data.normalize": True,                   # ch 2: standardise on the training fold, missing -> 0 + indicator
    "training.mask_missing_targets": True,    # ch 2: a missing target is left out of the loss, not fed as NaN
    "model.norm": "layernorm",                # ch 7: pre-norm LayerNorm bounds every block's input
    "training.gradient_clip_val": 1.0,        # ch 3: clipping via the Trainer, a guard against rare spikes
    "training.gradient_clip_algorithm": "norm",
    "training.clip_via": "trainer",           # ch 3: the configure_optimizers dict key is never applied
    "training.sanitize": "off",               # ch 4: replacing NaN hides a dead model
    "training.on_nonfinite": "stop",          # ch 4: fail at the first non-finite loss/gradient, with an autopsy
    "training.data_guard": True,              # ch 2/4: fail on a non-finite input, naming row and feature
    "training.warmup.enabled": True,          # ch 6: warmup counted in optimizer steps
    "training.warmup.interval": "step",
}
#: per dataset: an lr a safe factor below the edge of the stability map, warmup over the first ~2
#: epochs (Ishigami: 25 steps per epoch, Dyconex: 15), and enough steps to learn: Dyconex's shipped
#: 3 epochs at lr 1e-4 (45 steps) are finite once normalised but do not beat the mean; 10 epochs at
#: 3e-3, halved every 50 steps after the warmup (StepLR), do in every fold we ran.
RECOMMENDED_PER_DATASET: Dict[str, Dict[str, object]] = {
    "ishigami": {"training.lr": 3e-3, "training.warmup.total_iters": 50},
    "dyconex": {"training.lr": 3e-3, "training.max_epochs": 10, "training.warmup.total_iters": 30,
                "training.warmup.step_size": 50, "training.warmup.gamma": 0.5},
}


def recommended_config(dataset: str, overrides: Optional[Mapping[str, object]] = None) -> RunConfig:
    """``reproduction_config(dataset)`` with :data:`RECOMMENDED`, :data:`RECOMMENDED_PER_DATASET` and
    ``overrides`` (dotted keys) applied; named ``<dataset>_recommended``.

    Raises:
        ConfigError: unknown dataset or a bad override.
    """
    upd = {**RECOMMENDED, **RECOMMENDED_PER_DATASET.get(dataset, {}), **dict(overrides or {}),
           "name": f"{dataset}_recommended"}
    return reproduction_config(dataset).updated(upd)


def recommended_yaml(dataset: str) -> str:
    """The keys :func:`recommended_config` sets, as the YAML a user would put in a config file."""
    import yaml

    return yaml.safe_dump(_undot({**RECOMMENDED, **RECOMMENDED_PER_DATASET.get(dataset, {})}), sort_keys=False)
