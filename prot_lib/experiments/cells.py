"""One cell of a sweep: a configuration, the folds it trains, and what comes back (a row per fold).

Every sweep of the book (the fix matrix, the stability map over learning rate x clip setting, the clip
sweep, the seed rates) is a list of :class:`Cell` objects built by :func:`grid_cells`, run by
:func:`prot_lib.experiments.engine.run_cells`, and read as one table with :data:`ROW_COLUMNS`.

A row is what the fold's summary says (its fate, :mod:`prot_lib.training.fate`, read, never recomputed)
plus a few magnitudes of its history that the fate does not hold (the largest loss, the share of steps
clipped), plus where and how long the cell ran.

Clip settings are written as short labels, one grammar for every sweep and plot:

=================  =================================================================================
label              config keys set (``training.``)
=================  =================================================================================
``none``           ``gradient_clip_val: null`` (norm), ``clip_via: trainer``: no clipping
``norm 1``         ``gradient_clip_val: 1.0``, ``gradient_clip_algorithm: norm``: ``Trainer(gradient_clip_val=1.0)``
``value 0.5``      ``gradient_clip_val: 0.5``, ``gradient_clip_algorithm: value``
``autoclip p10``   ``gradient_clip_algorithm: autoclip``, ``autoclip_percentile: 10`` ("autoclip": the paper's p)
``zclip``          ``gradient_clip_algorithm: zclip`` with the ``zclip_*`` keys as configured (paper defaults)
=================  =================================================================================

:func:`setting_label` reads the label back from any config (``dict-key 1`` for the write-up's clip value
returned from ``configure_optimizers``, which Lightning never applies).
"""
from __future__ import annotations

import math
import os
import re
import socket
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Union

import numpy as np
import pandas as pd
import torch

from ..training import run_cache
from ..training.config import (ConfigError, RunConfig, TrainingConfig, config_from_dict, deep_merge, fix_overlay,
                               reproduction_config)
from ..training.kfold import SUMMARY_COLUMNS, KFoldResult, run_kfold
from .runtime import quiet_lightning

__all__ = [
    "CLIP_SETTINGS", "ROW_COLUMNS", "STAT_COLUMNS", "Cell", "setting_overrides", "setting_label", "clip_settings",
    "cell_config", "grid_cells", "history_stats", "fold_rows", "cell_result", "run_cell", "rows_frame",
]

#: the clip settings of the book's stability maps: none, three fixed norms, the two adaptive algorithms
CLIP_SETTINGS = ("none", "norm 0.1", "norm 1", "norm 10", "autoclip p10", "zclip")
#: the magnitudes :func:`history_stats` reads from a fold's history (the fate does not hold them)
STAT_COLUMNS = ["max_loss", "final_loss", "max_grad_norm", "median_grad_norm", "clipped_fraction",
                "median_threshold", "logged_loss_nonfinite"]
#: one row per (cell, fold) of a sweep: the cell's labels, the fold's summary (its fate), ``nonfinite``,
#: the history magnitudes, and where the cell ran
ROW_COLUMNS = ["dataset", "fix", "setting", "lr", "gradient_clip_val", "seed", *SUMMARY_COLUMNS, "nonfinite",
               *STAT_COLUMNS, "cell", "worker", "wall_s"]
#: at least this many optimizer steps per epoch in the shipped configs (Dyconex: 480 training rows /
#: batch 32 = 15; Ishigami: 25): :func:`cell_config` raises ``max_epochs`` by this rule
_MIN_STEPS_PER_EPOCH = 15
_RESULT_FORMAT = 1


# ------------------------------------------------------------------------------------- clip settings
_SETTING_RE = re.compile(r"^(?:(none|off)|(norm|value)\s+([0-9.eE+-]+)|autoclip(?:\s+p([0-9.eE+-]+))?|(zclip))$")


def setting_overrides(label: str) -> Dict[str, Any]:
    """The dotted ``training.*`` overrides of a clip setting label (see the module docstring).

    Raises:
        ConfigError: a label outside the grammar (names the label and the valid forms).
    """
    m = _SETTING_RE.match(str(label).strip())
    if not m:
        raise ConfigError(f"unknown clip setting {label!r}; valid: 'none', 'norm <value>', 'value <value>', "
                          f"'autoclip [p<percentile>]', 'zclip'")
    none, algo, value, percentile, zclip = m.groups()
    base = {"training.clip_via": "trainer", "training.gradient_clip_val": None,
            "training.gradient_clip_algorithm": "norm"}
    if none:
        return base
    if algo:
        return {**base, "training.gradient_clip_val": float(value), "training.gradient_clip_algorithm": algo}
    if zclip:
        return {**base, "training.gradient_clip_algorithm": "zclip"}
    out = {**base, "training.gradient_clip_algorithm": "autoclip"}
    if percentile is not None:
        out["training.autoclip_percentile"] = float(percentile)
    return out


def setting_label(training: TrainingConfig) -> str:
    """The clip setting of a config, as a label of the grammar (the inverse of :func:`setting_overrides`
    for configs it made). ``zclip``'s thresholds are not in its label; the config holds them."""
    t = training
    if t.gradient_clip_algorithm == "autoclip":
        return f"autoclip p{t.autoclip_percentile:g}"
    if t.gradient_clip_algorithm == "zclip":
        return "zclip"
    if not t.gradient_clip_val:
        return "none"
    if t.clip_via == "configure_optimizers":  # the write-up's dict key: Lightning never applies it
        return f"dict-key {t.gradient_clip_val:g}"
    return f"{t.gradient_clip_algorithm} {t.gradient_clip_val:g}"


def clip_settings(clips: Iterable[Optional[float]] = (None,), algorithms: Iterable[str] = ()) -> List[str]:
    """Labels for fixed ``gradient_clip_val`` values under "norm" (None or 0: "none") followed by
    adaptive algorithms ("autoclip", "zclip"), e.g. ``clip_settings([None, 1.0], ["zclip"])`` ->
    ``["none", "norm 1", "zclip"]``."""
    labels = ["none" if not c else f"norm {float(c):g}" for c in clips]
    labels += [setting_label(config_from_dict({}).updated(setting_overrides(a)).training) for a in algorithms]
    return labels


# --------------------------------------------------------------------------------------------- cells
def cell_config(base: RunConfig, lr: Optional[float] = None, setting: Optional[str] = None,
                seed: Optional[int] = None, overrides: Optional[Mapping[str, Any]] = None, max_steps: int = -1,
                extend_epochs: bool = False) -> RunConfig:
    """``base`` with a learning rate, a clip setting, a seed and further overrides set (None: keep
    the base's).

    Args:
        base: the run's configuration (e.g. ``reproduction_config("ishigami", "normalize")``).
        lr: ``training.lr`` (AdamW, per optimizer step).
        setting: a clip setting label (:func:`setting_overrides`).
        seed: ``training.seed`` (fold k re-seeds with ``seed + k``).
        overrides: further dotted overrides, e.g. ``{"model.n_layers": 2}``.
        max_steps, extend_epochs: with ``extend_epochs`` and ``max_steps > 0``, ``max_epochs`` is raised
            (never lowered) to ``ceil(max_steps / 15) + 1``, so a fold can reach ``max_steps`` whatever
            the dataset (15: the fewest optimizer steps per epoch of a shipped config).

    Raises:
        ConfigError: a bad setting label or override (names the key).
    """
    upd: Dict[str, Any] = {}
    if setting is not None:
        upd.update(setting_overrides(setting))
    if lr is not None:
        upd["training.lr"] = float(lr)
    if seed is not None:
        upd["training.seed"] = int(seed)
    upd.update(overrides or {})
    cfg = base.updated(upd) if upd else base
    if extend_epochs and max_steps > 0:
        need = math.ceil(max_steps / _MIN_STEPS_PER_EPOCH) + 1
        if need > cfg.training.max_epochs:
            cfg = cfg.updated({"training.max_epochs": need})
    return cfg


@dataclass(eq=False)
class Cell:
    """One unit of a sweep: train ``folds`` of ``config`` for ``max_steps`` steps.

    Attributes:
        config: the resolved :class:`RunConfig`.
        folds: fold indices, trained in one :func:`~prot_lib.training.kfold.run_kfold` call.
        max_steps: optimizer steps per fold (-1: the config's ``max_epochs``).
        labels: what the config cannot say about itself, copied into every row: ``dataset`` (the grid's
            label for the base) and ``fix`` (the overlay applied; None for a custom base), and any
            extra label a caller adds.
    """

    config: RunConfig
    folds: tuple
    max_steps: int = -1
    labels: Dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        """The run's identity (:func:`prot_lib.training.run_cache.run_key`): equal keys train the same
        thing, whatever the config's name or the cell's labels; the engine runs each key once."""
        return run_cache.run_key(self.config.to_dict(), self.folds, self.max_steps)

    def task(self) -> Dict[str, Any]:
        """What a worker needs (plain data, picklable, small): see :func:`run_cell`."""
        return {"key": self.key, "config": self.config.to_dict(), "folds": list(self.folds),
                "max_steps": int(self.max_steps), "cache_dir": os.environ.get(run_cache.ENV_VAR) or None}


BaseLike = Union[str, RunConfig, Mapping[str, Any]]


def _base_entry(label: str, value: BaseLike) -> Dict[str, Any]:
    if isinstance(value, RunConfig):
        return {"config": value}
    if isinstance(value, str):
        return {"dataset": value}
    if isinstance(value, Mapping):
        return dict(value)
    raise TypeError(f"base {label!r}: expected a dataset name, a RunConfig or a mapping, got {type(value).__name__}")


def grid_cells(bases: Union[BaseLike, Mapping[str, BaseLike]], *, fixes: Sequence[Optional[str]] = (None,),
               lrs: Sequence[Optional[float]] = (None,), settings: Sequence[Optional[str]] = (None,),
               seeds: Sequence[Optional[int]] = (None,), folds: Optional[Sequence[int]] = None,
               split_folds: bool = False, max_steps: int = -1, extend_epochs: bool = False,
               overrides: Optional[Mapping[str, Any]] = None) -> List[Cell]:
    """The cells of a grid: every base x fix x lr x setting x seed (x fold with ``split_folds``).

    Args:
        bases: a dataset name (``"ishigami"``: its shipped reproduction), a :class:`RunConfig`, or
            {label: either, or a mapping with ``dataset``/``config`` and per-base ``fixes``, ``lrs``,
            ``settings``, ``seeds``, ``folds``, ``max_steps`` that replace the grid-wide ones}.
        fixes: fix overlays (:data:`~prot_lib.training.config.FIXES`) applied on top of each base
            (None: none applied; labelled "none" for a dataset base, None for a custom config).
        lrs, settings, seeds: axes; None keeps the base's value (see :func:`cell_config`).
        folds: fold indices per cell (None: all ``k_fold``).
        split_folds: one cell per fold (more parallelism) instead of one cell per fold list.
        max_steps, extend_epochs, overrides: as :func:`cell_config`.

    Returns:
        the cells, in grid order (base, fix, lr, setting, seed, fold).

    Raises:
        ConfigError: an unknown dataset, fix or clip setting, or a bad override.
    """
    if isinstance(bases, (str, RunConfig)):
        bases = {bases if isinstance(bases, str) else bases.data.name: bases}
    cells: List[Cell] = []
    for label, value in bases.items():
        entry = _base_entry(label, value)
        unknown = set(entry) - {"dataset", "config", "fixes", "lrs", "settings", "seeds", "folds", "max_steps"}
        if unknown:
            raise ConfigError(f"base {label!r}: unknown keys {sorted(unknown)}")
        custom: Optional[RunConfig] = entry.get("config")
        dataset = entry.get("dataset", label)
        steps = int(entry.get("max_steps", max_steps))
        for fix in entry.get("fixes", fixes):
            if custom is not None:
                base = custom if fix in (None, "none") else config_from_dict(
                    deep_merge(custom.to_dict(), fix_overlay(fix)), source=f"{custom.name} + fix {fix}")
                fix_label = fix
            else:
                base = reproduction_config(dataset, fix or "none")
                fix_label = fix or "none"
            fold_sel = entry.get("folds", folds)
            for lr in entry.get("lrs", lrs):
                for setting in entry.get("settings", settings):
                    for seed in entry.get("seeds", seeds):
                        cfg = cell_config(base, lr, setting, seed, overrides, steps, extend_epochs)
                        fold_list = list(range(cfg.training.k_fold)) if fold_sel is None else [int(f) for f in fold_sel]
                        groups = [[f] for f in fold_list] if split_folds else [fold_list]
                        for group in groups:
                            cells.append(Cell(cfg, tuple(group), steps, {"dataset": label, "fix": fix_label}))
    return cells


# ------------------------------------------------------------------------------------------- results
def history_stats(history: pd.DataFrame) -> Dict[str, Any]:
    """Magnitudes of one fold's per-step history that its fate does not hold (:data:`STAT_COLUMNS`).

    ``max_loss``: largest finite raw loss; ``final_loss``: mean raw loss of the last 10 steps (NaN when
    one of them is not finite); ``max_grad_norm``, ``median_grad_norm``: of the finite pre-clip total
    gradient norms; ``clipped_fraction``: share of the steps with finite, positive norms whose post-clip
    norm is below 99.9 % of the pre-clip one (any clipping: fixed or adaptive); ``median_threshold``:
    median finite ``clip_threshold`` (NaN: nothing bounded the norm); ``logged_loss_nonfinite``: the
    logged, back-propagated ``train_loss`` was inf/NaN at some step (what a dashboard shows; under
    sanitisation it stays finite while the weights die). Undefined values are NaN.
    """
    h = history.sort_values("step") if len(history) else history

    def col(name: str) -> np.ndarray:
        return h[name].to_numpy(dtype=float) if name in h else np.array([])

    loss, before, after, thr, logged = (col("raw_loss"), col("grad_norm_before_clip"), col("grad_norm_after_clip"),
                                        col("clip_threshold"), col("train_loss"))
    fin_loss, fin_before, fin_thr = loss[np.isfinite(loss)], before[np.isfinite(before)], thr[np.isfinite(thr)]
    ok = np.isfinite(before) & np.isfinite(after) & (before > 0) if len(before) == len(after) else np.array([], bool)
    return {
        "max_loss": float(fin_loss.max()) if fin_loss.size else math.nan,
        "final_loss": float(np.mean(loss[-10:])) if loss.size else math.nan,
        "max_grad_norm": float(fin_before.max()) if fin_before.size else math.nan,
        "median_grad_norm": float(np.median(fin_before)) if fin_before.size else math.nan,
        "clipped_fraction": float((after[ok] < 0.999 * before[ok]).mean()) if ok.any() else math.nan,
        "median_threshold": float(np.median(fin_thr)) if fin_thr.size else math.nan,
        "logged_loss_nonfinite": bool((~np.isfinite(logged)).any()),
    }


def fold_rows(result: KFoldResult, folds: Optional[Iterable[int]] = None) -> List[Dict[str, Any]]:
    """One dict per fold of ``result`` (or of ``folds``): ``fold``, the fold's summary (its fate, as
    :meth:`KFoldResult.fold_summary` gives it: missing values None), ``nonfinite`` (the fate's
    ``first_nonfinite_step`` is set: a loss, gradient or weight went inf/NaN at some step) and
    :func:`history_stats`.

    Raises:
        KeyError: a fold ``result`` did not train.
    """
    have = [int(f) for f in result.summary["fold"]]
    rows = []
    for fold in (have if folds is None else [int(f) for f in folds]):
        if fold not in have:
            raise KeyError(f"fold {fold} not in the run (it trained folds {have})")
        s = result.fold_summary(fold)
        h = result.history[result.history["fold"] == fold] if len(result.history) else result.history
        rows.append({"fold": fold, **s, "nonfinite": s["first_nonfinite_step"] is not None, **history_stats(h)})
    return rows


def cell_result(result: KFoldResult, key: str, folds: Optional[Iterable[int]] = None, wall_s: float = math.nan,
                worker: Optional[str] = None) -> Dict[str, Any]:
    """The JSON-ready record of a finished cell (what the engine stores per cell and assembles rows
    from): ``format``, ``key``, ``config``, ``folds``, ``rows`` (:func:`fold_rows`), ``warnings``
    (Lightning's, deduplicated), ``worker``, ``wall_s`` (seconds), ``source``
    (:func:`~prot_lib.training.run_cache.source_fingerprint` of the code that ran it), ``torch``."""
    rows = fold_rows(result, folds)
    return {"format": _RESULT_FORMAT, "key": key, "config": result.config.to_dict(),
            "folds": [r["fold"] for r in rows], "rows": rows, "warnings": list(dict.fromkeys(result.warnings)),
            "worker": worker or f"{socket.gethostname()}:{os.getpid()}", "wall_s": wall_s,
            "source": run_cache.source_fingerprint(), "torch": torch.__version__}


def run_cell(task: Mapping[str, Any]) -> Dict[str, Any]:
    """Train one cell and return its :func:`cell_result` (this is what runs on a worker).

    Args:
        task: :meth:`Cell.task`: ``key``, ``config`` (``RunConfig.to_dict()``), ``folds``, ``max_steps``,
            ``cache_dir`` (the caller's ``PROT_LIB_CACHE``, passed on so a worker reads and fills the
            same run cache; None: no cache).

    The fold's logs go to a temporary folder that is deleted afterwards; Lightning is silenced. The
    run cache is consulted exactly as :func:`~prot_lib.training.kfold.run_kfold` always does.
    """
    cfg = config_from_dict(task["config"], source=f"cell {task['key']}")
    old_cache = os.environ.get(run_cache.ENV_VAR)
    if task.get("cache_dir"):
        os.environ[run_cache.ENV_VAR] = str(task["cache_dir"])
    else:
        os.environ.pop(run_cache.ENV_VAR, None)
    try:
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="prot_lib_cell_") as tmp, quiet_lightning():
            res = run_kfold(cfg, folds=task["folds"], max_steps=int(task["max_steps"]), run_dir=Path(tmp),
                            progress=False, keep_models=False, num_threads=1)
        return cell_result(res, task["key"], wall_s=round(time.perf_counter() - t0, 3))
    finally:
        if old_cache is None:
            os.environ.pop(run_cache.ENV_VAR, None)
        else:
            os.environ[run_cache.ENV_VAR] = old_cache


_INT_COLUMNS = ("fold", "seed", "n_steps", "n_skipped", "n_rollbacks")
_STEP_COLUMNS = ("first_nonfinite_loss_step", "first_nonfinite_grad_step", "first_nonfinite_param_step",
                 "first_nonfinite_step", "first_nonfinite_epoch")
_FLOAT_COLUMNS = ("lr", "gradient_clip_val", "final_val_rmse", "target_std", "rmse_ratio", "max_loss", "final_loss",
                  "max_grad_norm", "median_grad_norm", "clipped_fraction", "median_threshold", "wall_s")


def rows_frame(cells: Sequence[Cell], results: Mapping[str, Mapping[str, Any]]) -> pd.DataFrame:
    """The sweep's table: one row per (cell, fold), :data:`ROW_COLUMNS` (then any extra label).

    ``dataset`` and ``fix`` come from the cell's labels; ``setting`` (:func:`setting_label`), ``lr``,
    ``gradient_clip_val`` (NaN when not clipping by a fixed value) and ``seed`` from its config; the
    rest from ``results[cell.key]`` (:func:`cell_result`). Fold steps are pandas ``Int64`` (NA: never).
    """
    records = []
    for cell in cells:
        res = results[cell.key]
        t = cell.config.training
        setting = setting_label(t)
        derived = {"setting": setting, "lr": t.lr, "seed": t.seed,
                   "gradient_clip_val": float(t.gradient_clip_val)
                   if setting.startswith(("norm ", "value ")) else math.nan}
        for row in res["rows"]:
            records.append({**cell.labels, **derived, **row, "cell": cell.key, "worker": res["worker"],
                            "wall_s": res["wall_s"]})
    extra = [c for c in dict.fromkeys(k for r in records for k in r) if c not in ROW_COLUMNS]
    df = pd.DataFrame.from_records(records, columns=ROW_COLUMNS + extra)
    for c in _STEP_COLUMNS:
        df[c] = pd.array([None if v is None or (isinstance(v, float) and math.isnan(v)) else int(v)
                          for v in df[c]], dtype="Int64")
    for c in _FLOAT_COLUMNS:
        df[c] = pd.to_numeric(df[c], errors="coerce").astype(float)
    for c in _INT_COLUMNS:
        if df[c].notna().all():
            df[c] = df[c].astype(int)
    for c in ("nonfinite", "params_finite_end", "val_finite_end", "logged_loss_nonfinite"):
        df[c] = df[c].astype(bool)
    return df
