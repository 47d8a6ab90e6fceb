"""Chapter 9's evidence: every fix on every dataset, one table.

:func:`fix_matrix` trains ``reproduction_config(dataset, fix)`` for each (dataset, fix): the same configs
and the same :func:`~prot_lib.training.kfold.run_kfold` as chapters 1-8, so ``PROT_LIB_CACHE`` reads
their runs back. Two fixes whose configs are the same run (Dyconex's ``lower-lr``: its shipped lr
already is 1e-4) are trained once, and the table says so (``same_config_as``).

Every count here reads the folds' rows (:func:`~prot_lib.experiments.cells.fold_rows`), which carry each
fold's fate as :mod:`prot_lib.training.fate` defines it.
"""
from __future__ import annotations

from collections import abc
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import pandas as pd

from ..training.fate import fate_counts
from ..training.kfold import KFoldResult, run_kfold
from .cells import Cell, cell_result, grid_cells
from .engine import run_cells
from .runtime import quiet_lightning
from .specs import load_spec

__all__ = ["FIX_TABLE_COLUMNS", "FixMatrix", "LazyRuns", "fix_matrix", "fix_table", "subset_result"]
#: one row per (dataset, fix) in :attr:`FixMatrix.table`
FIX_TABLE_COLUMNS = [
    "dataset", "fix", "n_folds", "folds_nonfinite_loss", "folds_nonfinite_logged_loss", "folds_nan_params_end",
    "frac_nan_params_end", "folds_dead", "first_nonfinite_step", "n_live_folds", "n_blown_up", "median_val_rmse",
    "target_std", "rmse_over_std", "same_config_as",
]
#: :func:`~prot_lib.training.fate.fate_counts` column -> its name in :data:`FIX_TABLE_COLUMNS`
_FIX_COUNTS = {
    "n_folds": "n_folds", "n_nonfinite_loss": "folds_nonfinite_loss", "n_lost": "folds_nan_params_end",
    "n_dead": "folds_dead", "first_nonfinite_step": "first_nonfinite_step", "n_live": "n_live_folds",
    "n_blown_up": "n_blown_up", "median_val_rmse": "median_val_rmse", "target_std": "target_std",
    "median_rmse_ratio_live": "rmse_over_std",
}


class LazyRuns(abc.Mapping):
    """{(dataset, fix): KFoldResult} of a fix matrix, each run fetched on first access.

    The engine returns rows, not runs (a worker's models and histories stay with the worker). A run
    asked for is read from ``known`` (sliced to the cell's folds), else obtained from
    :func:`~prot_lib.training.kfold.run_kfold`, which reads it back from the run cache that the
    engine's workers filled (``PROT_LIB_CACHE``; the book build and the notebook tests set it), and
    trains it again in this process only when there is no cache. Two fixes that are one run share
    one result.
    """

    def __init__(self, cells: Mapping[Tuple[str, str], Cell], known: Mapping[Tuple[str, str], KFoldResult]):
        self._cells, self._known = dict(cells), dict(known)
        self._by_key: Dict[str, KFoldResult] = {}

    def __getitem__(self, item: Tuple[str, str]) -> KFoldResult:
        cell = self._cells[item]
        if cell.key not in self._by_key:
            if item in self._known:
                self._by_key[cell.key] = subset_result(self._known[item], cell.folds)
            else:
                with quiet_lightning():
                    self._by_key[cell.key] = run_kfold(cell.config, folds=list(cell.folds), max_steps=cell.max_steps,
                                                       progress=False, keep_models=False)
        return self._by_key[cell.key]

    def __iter__(self) -> Iterator[Tuple[str, str]]:
        return iter(self._cells)

    def __len__(self) -> int:
        return len(self._cells)


@dataclass
class FixMatrix:
    """What :func:`fix_matrix` returns.

    Attributes:
        table: one row per (dataset, fix), :data:`FIX_TABLE_COLUMNS` (:func:`fix_table`).
        per_fold: the sweep's rows (:data:`~prot_lib.experiments.cells.ROW_COLUMNS`), one per
            (dataset, fix, fold), plus ``loss_nonfinite`` (the fate's ``first_nonfinite_loss_step`` set).
        runs: {(dataset, fix): KFoldResult} restricted to the requested folds, fetched on first access
            (:class:`LazyRuns`: from ``known`` or the run cache).
    """

    table: pd.DataFrame
    per_fold: pd.DataFrame
    runs: Mapping[Tuple[str, str], KFoldResult] = field(default_factory=dict, repr=False)

    @classmethod
    def from_rows(cls, rows: pd.DataFrame, runs: Optional[Mapping[Tuple[str, str], KFoldResult]] = None,
                  max_steps: int = -1) -> "FixMatrix":
        """A fix matrix from rows already run, e.g. a shipped sweep's
        (:func:`~prot_lib.experiments.shipped.load_shipped`, the ``fix-matrix`` spec).

        Shipped rows carry no ``cell`` (its key names the code that ran it); it is restored as today's
        key of (dataset, fix) at ``max_steps``, which is all :func:`fix_table` reads it for (two fixes
        that are one config: ``same_config_as``).

        Args:
            rows: one row per (dataset, fix, fold), :data:`~prot_lib.experiments.cells.ROW_COLUMNS`.
            runs: {(dataset, fix): KFoldResult} to attach as :attr:`runs` (e.g. a live re-run of some folds).
            max_steps: the rows' optimizer steps per fold (-1: the configs' ``max_epochs``).

        Raises:
            KeyError: a row lacks ``dataset``, ``fix``, ``first_nonfinite_loss_step`` or a fate column.
            ConfigError: an unknown dataset or fix.
        """
        if "cell" not in rows:
            pairs = rows[["dataset", "fix"]].drop_duplicates()
            key = {(ds, fix): grid_cells({ds: {}}, fixes=[fix], max_steps=max_steps)[0].key
                   for ds, fix in pairs.itertuples(index=False)}
            rows = rows.assign(cell=[key[(ds, fix)] for ds, fix in zip(rows["dataset"], rows["fix"])])
        per_fold = rows.assign(loss_nonfinite=rows["first_nonfinite_loss_step"].notna())
        return cls(table=fix_table(rows), per_fold=per_fold, runs=dict(runs or {}))

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


def fix_table(rows: pd.DataFrame) -> pd.DataFrame:
    """One row per (dataset, fix) of a sweep's rows, in the order run (:data:`FIX_TABLE_COLUMNS`).

    ``folds_nonfinite_loss``: folds whose raw loss was inf/NaN at some step;
    ``folds_nonfinite_logged_loss``: folds whose logged, back-propagated ``train_loss`` was inf/NaN (what a
    dashboard shows); ``folds_nan_params_end`` (and its fraction): folds that ended with a non-finite
    weight; ``folds_dead``: folds whose fate is "dead" (non-finite weights or validation metrics at the
    end); ``first_nonfinite_step``: the earliest step, within its fold, at which a loss, gradient or
    weight went non-finite (NA: never); ``n_live_folds``: folds with finite weights at the end;
    ``n_blown_up``: live folds whose fate is "blown_up" (finite weights, validation RMSE at least twice the
    target std: a near-divergence, :mod:`prot_lib.training.fate`); ``median_val_rmse``: median last
    validation RMSE (target units) over the live folds that ran a validation epoch (NaN if none: a dead
    fold's RMSE is left out even when finite, as sanitised predictions make it; a median, because one
    blown-up fold would dominate a mean); ``target_std``: mean over the folds of their validation targets'
    standard deviation (the RMSE of predicting the mean); ``rmse_over_std``: median of the fates'
    ``rmse_ratio`` over those live folds (< 1: better than predicting the mean); ``same_config_as``: an earlier fix of the same dataset
    whose run this is (same cell key), else None.

    The fate counts and medians are :func:`prot_lib.training.fate.fate_counts`' (``n_lost``, ``n_live``,
    ``median_val_rmse``, ``median_rmse_ratio_live``, ...) under this table's names.

    Raises:
        KeyError: a row lacks a fate column, ``dataset``, ``fix``, ``cell`` or ``logged_loss_nonfinite``.
        ValueError: an unknown ``fate`` (names the row).
    """
    keys = ["dataset", "fix"]
    t = fate_counts(rows, keys, columns=_FIX_COUNTS).reset_index()
    groups = rows.groupby(keys, sort=False)  # the groups of fate_counts, in the same order
    t["folds_nonfinite_logged_loss"] = groups["logged_loss_nonfinite"].sum().astype("int64").to_numpy()
    t["frac_nan_params_end"] = t["folds_nan_params_end"] / t["n_folds"]
    cell_of = groups["cell"].agg(lambda c: c.iloc[0])  # a (dataset, fix) is one cell
    first_fix_of_key: Dict[Tuple[str, str], str] = {}
    twins = [first_fix_of_key.setdefault((dataset, cell), fix) for (dataset, fix), cell in cell_of.items()]
    t["same_config_as"] = [twin if twin != fix else None for twin, fix in zip(twins, t["fix"])]
    return t[FIX_TABLE_COLUMNS]


def fix_matrix(folds: Mapping[str, Optional[Sequence[int]]], fixes: Optional[Sequence[str]] = None,
               known: Optional[Mapping[Tuple[str, str], KFoldResult]] = None, max_steps: int = -1,
               **engine: Any) -> FixMatrix:
    """Train every fix of ``fixes`` on every dataset of ``folds`` and tabulate the outcome.

    Args:
        folds: {dataset: fold indices, or None for all ``k_fold`` folds}, e.g. ``{"ishigami": [3],
            "dyconex": None}``.
        fixes: names from :data:`~prot_lib.training.config.FIXES` (default: the ``fixes`` of the
            ``fix-matrix`` sweep spec, ``prot_lib/configs/sweeps/fix-matrix.yaml``: every fix, in the
            order the book tells them).
        known: runs already in hand, {(dataset, fix): KFoldResult} of the same config with (at least)
            the requested folds; their rows are read from them (sliced to the folds), not retrained.
        max_steps: optimizer steps per fold (-1: the config's ``max_epochs``).
        **engine: passed to :func:`~prot_lib.experiments.engine.run_cells` (``engine``, ``n_jobs``,
            ``scheduler``, ``out``, ``progress``).

    Returns:
        :class:`FixMatrix`.

    Raises:
        ConfigError: unknown dataset or fix.
        KeyError: a ``known`` run lacks a requested fold.
    """
    if fixes is None:
        fixes = load_spec("fix-matrix").fixes
    cells: List[Cell] = []
    for dataset, fold_sel in folds.items():
        cells += grid_cells({dataset: {}}, fixes=list(fixes), folds=fold_sel, max_steps=max_steps)
    given: Dict[str, Dict[str, Any]] = {}
    for cell in cells:
        res = (known or {}).get((cell.labels["dataset"], cell.labels["fix"]))
        if res is not None:
            given[cell.key] = cell_result(res, cell.key, folds=cell.folds, worker="known")
    engine.setdefault("desc", "fix matrix")
    rows = run_cells(cells, known=given, **engine)
    runs = LazyRuns({(c.labels["dataset"], c.labels["fix"]): c for c in cells}, known or {})
    return FixMatrix.from_rows(rows, runs=runs)
