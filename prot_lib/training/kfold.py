"""k-fold training with scikit-learn's ``KFold``, one fresh, seeded model per fold.

This is the write-up's protocol: on Ishigami the first fold trained and a later fold went NaN. Each
fold re-seeds (``seed + fold``) and re-initialises the model, so a fold's fate depends on its data
split and its initial weights, not on the previous fold.
"""
from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, List, Optional, Sequence, Union

import lightning.pytorch as pl
import numpy as np
import pandas as pd
import torch
from lightning.pytorch.loggers import CSVLogger
from sklearn.model_selection import KFold
from torch.utils.data import DataLoader, TensorDataset

from ..data import SequenceData, load_dataset
from ..diagnostics.autopsy import NonFiniteTrainingError
from ..models import buffer_pool
from .config import RunConfig
from .fate import FATE_COLUMNS, fold_fate, writeup_pattern
from .history import HistoryRecorder, params_all_finite
from .module import NaNStudyModule
from . import ledger, run_cache
from .safety_nets import safety_nets

#: one row per fold: its fate (:mod:`prot_lib.training.fate`, the only definition), the steps
#: ``training.on_nonfinite`` dropped, and the autopsy of the first dropped one
SUMMARY_COLUMNS = ["fold", "n_steps", *FATE_COLUMNS, "n_skipped", "n_rollbacks", "first_dropped_step",
                   "autopsy_verdict", "bundle"]


def _in_ci_or_papermill() -> bool:
    """No progress bar in CI, under pytest, or when the book build says so (``PROT_LIB_PROGRESS=0``)."""
    return (bool(os.environ.get("CI")) or os.environ.get("PROT_LIB_PROGRESS") == "0"
            or "PYTEST_CURRENT_TEST" in os.environ)


def _default_run_dir(name: str) -> Path:
    """``runs/<name>/<time>-<random>``: a fresh folder per run, so two runs of one config (two
    notebooks, two terminals) never write into each other's CSV logs."""
    parent = Path("runs") / name
    parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=time.strftime("%Y%m%d-%H%M%S-"), dir=parent))


def _plain(v):
    """pandas/numpy scalars -> JSON-ready Python values (missing -> None)."""
    if v is None or v is pd.NA or (isinstance(v, float) and math.isnan(v)):
        return None
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    if isinstance(v, (int, np.integer)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        return float(v)
    return v


@dataclass
class KFoldResult:
    """What :func:`run_kfold` returns.

    Attributes:
        config: the run's :class:`RunConfig`.
        history: one row per optimizer step (see :mod:`prot_lib.training.history`).
        epochs: one row per validation epoch (fold, epoch, step, val_loss, val_rmse).
        summary: one row per fold, :data:`SUMMARY_COLUMNS`: the fold's fate as
            :func:`prot_lib.training.fate.fold_fate` defines it (first non-finite loss, gradient,
            parameter and overall step, finite at the end, ``rmse_ratio``, ``fate``), and the steps
            ``training.on_nonfinite`` dropped: ``n_skipped`` (skip), ``n_rollbacks`` (rollback),
            ``first_dropped_step`` (the first of them), ``autopsy_verdict`` (its autopsy's one-sentence
            verdict: where the non-finite value came from) and ``bundle`` (its repro bundle, a path
            string: ``python -m prot_lib autopsy BUNDLE`` replays it); None when nothing was dropped.
        param_grad_norms: per-parameter gradient norms per step (long format: ``fold, step, param,
            grad_norm_before_clip, grad_norm_after_clip``, plus ``param == "total"``), when
            ``training.log_param_grad_norms`` is on; else empty.
        warnings: the warnings Lightning raised during each fold, as ``"fold N: message"``.
        run_dir: the folder holding the CSV logs.
        models: the trained modules, one per fold (kept in memory for inspection).
    """

    config: RunConfig
    history: pd.DataFrame
    epochs: pd.DataFrame
    summary: pd.DataFrame
    param_grad_norms: pd.DataFrame
    warnings: List[str]
    run_dir: Path
    models: List[NaNStudyModule] = field(default_factory=list, repr=False)

    @property
    def nan_folds(self) -> List[int]:
        """Folds that went non-finite at some step (``first_nonfinite_step`` set: a loss, gradient or
        parameter), whether or not they ended dead."""
        s = self.summary
        return [int(f) for f in s.loc[s["first_nonfinite_step"].notna(), "fold"]]

    @property
    def dead_folds(self) -> List[int]:
        """Folds whose ``fate`` is "dead": non-finite weights or validation metrics at the end."""
        s = self.summary
        return [int(f) for f in s.loc[s["fate"] == "dead", "fold"]]

    @property
    def all_dead(self) -> bool:
        """Every fold that ran ended ``"dead"`` (non-finite weights or validation metrics at the end):
        nothing this run trained can be used. The CLI exits with status 4 then."""
        return bool(len(self.summary)) and bool((self.summary["fate"] == "dead").all())

    @property
    def writeup_pattern(self) -> bool:
        """The write-up's Ishigami symptom: fold 0 stayed finite and a later fold went non-finite
        (:func:`prot_lib.training.fate.writeup_pattern`)."""
        return writeup_pattern(self.summary)

    @property
    def first_nan_step(self) -> Optional[int]:
        """The first step (within its fold) with a non-finite training loss, in the earliest fold
        that had one; None if the loss stayed finite in every fold."""
        s = self.summary.dropna(subset=["first_nonfinite_loss_step"])
        return None if s.empty else int(s.sort_values("fold")["first_nonfinite_loss_step"].iloc[0])

    def fold_summary(self, fold: int) -> dict:
        """The summary row of one fold as a dict (NaN-free: missing steps are None)."""
        row = self.summary.set_index("fold").loc[fold].to_dict()
        return {k: _plain(v) for k, v in row.items()}

    def to_records(self) -> List[dict]:
        """Per-fold summaries as JSON-ready dicts (the ``reproduce --json`` output)."""
        return [dict(fold=int(f), **{k: v for k, v in self.fold_summary(int(f)).items()}) for f in self.summary["fold"]]


def _summarise(fold: int, steps: pd.DataFrame, epochs: pd.DataFrame, module: NaNStudyModule,
               val_targets: torch.Tensor, recorder: HistoryRecorder) -> dict:
    guard = recorder.guard
    dropped = guard is not None and guard.first_step is not None
    report = guard.first_report if dropped else None
    return {
        "fold": fold, "n_steps": len(steps),
        **fold_fate(steps, epochs, params_all_finite(module), val_targets.numpy()),
        "n_skipped": int((steps["action"] == "skip").sum()) if "action" in steps else 0,
        "n_rollbacks": int((steps["action"] == "rollback").sum()) if "action" in steps else 0,
        "first_dropped_step": guard.first_step if dropped else None,
        "autopsy_verdict": report.verdict() if report is not None else None,
        "bundle": str(guard.first_bundle) if dropped and guard.first_bundle is not None else None,
    }


def make_loaders(data: SequenceData, train_idx: np.ndarray, val_idx: np.ndarray, batch_size: int, seed: int,
                 with_rows: bool = False):
    """Train/val DataLoaders over ``(x: (batch, L, F), y: (batch,))``; the train order is seeded.

    With ``with_rows`` (``training.data_guard``) each batch is ``(x, y, rows)``: the same ``x`` and ``y``
    in the same order, plus ``rows: (batch,) int64``, each sample's row in ``data``, so that
    :class:`prot_lib.callbacks.DataGuard` can name the row and its id.
    """
    def dataset(idx):
        idx = torch.as_tensor(np.asarray(idx), dtype=torch.long)
        tensors = (data.x[idx], data.y[idx]) + ((idx,) if with_rows else ())
        return TensorDataset(*tensors)

    train, val = dataset(train_idx), dataset(val_idx)
    g = torch.Generator().manual_seed(seed)
    return (DataLoader(train, batch_size=batch_size, shuffle=True, generator=g),
            DataLoader(val, batch_size=max(batch_size, 256), shuffle=False))


def fold_indices(n: int, k: int, seed: int) -> List[tuple]:
    """``KFold(n_splits=k, shuffle=True, random_state=seed)`` splits as a list of (train, val)."""
    return list(KFold(n_splits=k, shuffle=True, random_state=seed).split(np.arange(n)))


def train_fold(config: RunConfig, data: SequenceData, fold: int, train_idx, val_idx, run_dir: Path,
               progress: bool = False, callbacks: Sequence[pl.Callback] = (), max_steps: int = -1):
    """Train one fold; returns ``(module, recorder, warnings)``.

    The Trainer gets ``callbacks`` first (so e.g. a fault planted in a gradient is seen by the guard),
    then the safety nets the config asks for (:func:`prot_lib.training.safety_nets.safety_nets`), the
    :class:`HistoryRecorder` (``recorder.guard`` is the fold's guard, if any), then early stopping and
    checkpointing.

    Raises:
        NonFiniteTrainingError: ``training.on_nonfinite`` stopped the fold; ``err.history`` holds the
            steps before it.
        prot_lib.data.DataError: ``training.data_guard`` met a non-finite input or target.
    """
    t = config.training
    pl.seed_everything(t.seed + fold, workers=True, verbose=False)
    fold_data = data.normalized(train_idx) if config.data.normalize else data
    train_dl, val_dl = make_loaders(fold_data, train_idx, val_idx, t.batch_size, t.seed + fold,
                                    with_rows=t.data_guard)
    module = NaNStudyModule(config, n_features=fold_data.x.shape[-1])
    nets = safety_nets(config, Path(run_dir) / f"fold{fold}", fold, fold_data)
    recorder = HistoryRecorder(fold, monitor=nets.monitor, guard=nets.guard, clipper=nets.clipper)
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_epochs=t.max_epochs, max_steps=max_steps,
        logger=CSVLogger(str(run_dir), name=f"fold{fold}", version=""),
        callbacks=[*callbacks, *nets.step_callbacks, recorder, *nets.end_callbacks],
        enable_progress_bar=progress, enable_model_summary=False,
        num_sanity_val_steps=0, log_every_n_steps=1, deterministic=True, **nets.trainer_kwargs,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            trainer.fit(module, train_dl, val_dl)
        except NonFiniteTrainingError as err:  # on_nonfinite stop/abort: keep the steps before it
            err.history = pd.DataFrame(recorder.steps)
            raise
    # Kept, not re-emitted: the book shows them (Lightning warns about the write-up's dict key once per
    # process otherwise, so later folds would be silent).
    messages = list(dict.fromkeys(f"fold {fold}: {w.message}" for w in caught
                                  if not issubclass(w.category, (DeprecationWarning, FutureWarning))))
    return module, recorder, messages


def fold_start(config: RunConfig, fold: int, data: Optional[SequenceData] = None):
    """A fold as :func:`train_fold` starts it: the freshly initialised model and its first training batch.

    The same seeding, data split, normalisation, loaders and module construction as ``train_fold``,
    without a Trainer: what the first optimizer step will see. Used to look inside a run before it
    trains (e.g. :func:`prot_lib.diagnostics.scale.layer_stats` of every fold at step 0).

    Args:
        config: the run's config.
        fold: fold index, 0 <= fold < ``config.training.k_fold``.
        data: the dataset (default: ``load_dataset(config.data.name)``).

    Returns:
        ``(model, x, y)``: the :class:`~prot_lib.models.S6Regressor` in eval mode (dropout off),
        ``x: (batch, L, F)`` and ``y: (batch,)`` of the fold's first training batch.

    Raises:
        ValueError: ``fold`` outside ``range(k_fold)``.
    """
    t = config.training
    if not 0 <= fold < t.k_fold:
        raise ValueError(f"fold must be in 0..{t.k_fold - 1} (training.k_fold = {t.k_fold}), got {fold}")
    data = load_dataset(config.data.name) if data is None else data
    train_idx, val_idx = fold_indices(len(data), t.k_fold, t.seed)[fold]
    pl.seed_everything(t.seed + fold, workers=True, verbose=False)
    fold_data = data.normalized(train_idx) if config.data.normalize else data
    train_dl, _ = make_loaders(fold_data, train_idx, val_idx, t.batch_size, t.seed + fold)
    module = NaNStudyModule(config, n_features=fold_data.x.shape[-1])
    x, y = next(iter(train_dl))
    return module.model.eval(), x, y


def run_kfold(config: RunConfig, folds: Optional[Iterable[int]] = None, data: Optional[SequenceData] = None,
              run_dir: Union[str, Path, None] = None, progress: Optional[bool] = None,
              callbacks: Sequence[pl.Callback] = (), keep_models: bool = True,
              max_steps: int = -1, num_threads: Optional[int] = 1) -> KFoldResult:
    """Train ``config.training.k_fold`` folds (or only ``folds``) and collect their histories.

    Args:
        config: the run's configuration.
        folds: which fold indices to run (default all ``k_fold``); e.g. ``[0]`` for a quick look.
        data: the dataset (default: ``load_dataset(config.data.name, config.data.data_dir)``).
        run_dir: where CSV logs go (default a fresh ``runs/<config.name>/<time>-<random>/``).
        progress: show Lightning's progress bar (default: on, except under CI/papermill/pytest).
        callbacks: extra Lightning callbacks for every fold.
        keep_models: keep each fold's trained module in ``result.models``.
        max_steps: stop each fold after this many optimizer steps (-1: run ``max_epochs``).
        num_threads: torch CPU threads during the run (restored after). These models are tiny: one
            thread is faster than two on a loaded 2-core machine, and the result does not depend on it.

    Runs are deterministic for a given machine. When the environment variable ``PROT_LIB_CACHE``
    names a folder (the book build and the notebook tests set it), a finished run is stored there
    (:mod:`prot_lib.training.run_cache`: keyed by the config without its name, the folds, ``max_steps``
    and a hash of the library's source), and the same run asked again (by a later chapter) is read
    back instead of recomputed. Runs given ``data`` or ``callbacks`` are never cached. When
    ``PROT_LIB_LEDGER`` names a file, every call appends one line to it (:mod:`prot_lib.training.ledger`:
    folds, optimizer steps, seconds, cached or trained), from which the book build reports what each
    chapter trained.

    Returns:
        :class:`KFoldResult`.

    Raises:
        prot_lib.data.DataError: the dataset files are missing or malformed, or ``training.data_guard``
            met a non-finite input or target (the message names batch, row and feature).
        prot_lib.callbacks.NonFiniteTrainingError: ``training.on_nonfinite`` stopped a fold (``stop``, or
            ``max_consecutive_skips`` dropped steps in a row); ``err.report`` is the autopsy.
    """
    t = config.training
    fold_list = list(range(t.k_fold)) if folds is None else [int(f) for f in folds]
    t0 = time.perf_counter()
    # the run cache (prot_lib.training.run_cache): never for runs given their own data or callbacks
    cache = None if (callbacks or data is not None) else run_cache.entry_path(config.to_dict(), fold_list, max_steps)
    if cache is not None and cache.is_file():
        result = _load_cached(cache, config, keep_models)
        if run_dir is not None:  # the caller asked for the logs there: copy the cached ones
            shutil.copytree(result.run_dir, run_dir, dirs_exist_ok=True)
            result.run_dir = Path(run_dir)
        _to_ledger(config, fold_list, result, time.perf_counter() - t0, cached=True)
        return result
    old_threads = torch.get_num_threads()
    if num_threads:
        torch.set_num_threads(num_threads)
    try:
        # a cached entry always holds the weights, whoever asks for it later
        result = _run_kfold(config, fold_list, data, run_dir, progress, callbacks, keep_models or cache is not None,
                            max_steps)
    finally:
        torch.set_num_threads(old_threads)
        buffer_pool.clear()  # the scan's reused memory back to the C library between runs
    if cache is not None:
        _save_cached(cache, result)
        if not keep_models:
            result.models = []
    _to_ledger(config, fold_list, result, time.perf_counter() - t0, cached=False)
    return result


def _to_ledger(config: RunConfig, fold_list: List[int], result: KFoldResult, seconds: float, cached: bool) -> None:
    """One line in ``$PROT_LIB_LEDGER`` when it is set (:mod:`prot_lib.training.ledger`)."""
    steps = int(result.summary["n_steps"].sum())  # SUMMARY_COLUMNS: every summary has it
    ledger.record_run(config, len(fold_list), steps, seconds, cached)


def _save_cached(path: Path, result: KFoldResult) -> None:
    """Store a finished run in the run cache: its tables, its weights and its CSV logs."""
    payload = {"history": result.history, "epochs": result.epochs, "summary": result.summary,
               "param_grad_norms": result.param_grad_norms, "warnings": result.warnings,
               "models": [(m.hparams["n_features"], m.state_dict()) for m in result.models]}
    run_cache.save_entry(path, payload, logs=Path(result.run_dir))


def _load_cached(path: Path, config: RunConfig, keep_models: bool = True) -> KFoldResult:
    d = run_cache.load_entry(path)
    models = []
    for n_features, state in (d["models"] if keep_models else []):
        m = NaNStudyModule(config, n_features=n_features)
        m.load_state_dict(state)
        models.append(m)
    return KFoldResult(config=config, history=d["history"], epochs=d["epochs"], summary=d["summary"],
                       param_grad_norms=d["param_grad_norms"], warnings=d["warnings"],
                       run_dir=Path(d["run_dir"]), models=models)


def _run_kfold(config, fold_list, data, run_dir, progress, callbacks, keep_models, max_steps) -> KFoldResult:
    t = config.training
    if data is None:
        data = load_dataset(config.data.name, config.data.data_dir)
    run_dir = Path(run_dir) if run_dir is not None else _default_run_dir(config.name)
    if progress is None:
        progress = not _in_ci_or_papermill()
    splits = fold_indices(len(data), t.k_fold, t.seed)
    steps, epochs, pgn, summaries, msgs, models = [], [], [], [], [], []
    for fold in fold_list:
        train_idx, val_idx = splits[fold]
        module, rec, fold_msgs = train_fold(config, data, fold, train_idx, val_idx, run_dir,
                                            progress=progress, callbacks=callbacks, max_steps=max_steps)
        s_df = pd.DataFrame(rec.steps)
        e_df = pd.DataFrame(rec.epochs)
        summaries.append(_summarise(fold, s_df, e_df, module, data.y[val_idx], rec))
        steps.append(s_df)
        epochs.append(e_df)
        pgn.append(pd.DataFrame(rec.param_grad_norms))
        msgs.extend(fold_msgs)
        if keep_models:
            models.append(module)
    history = pd.concat(steps, ignore_index=True) if steps else pd.DataFrame()
    epochs_df = pd.concat(epochs, ignore_index=True) if epochs else pd.DataFrame()
    if len(history) and len(epochs_df):
        history = history.merge(epochs_df[["fold", "epoch", "val_loss"]], on=["fold", "epoch"], how="left")
    summary = pd.DataFrame(summaries, columns=SUMMARY_COLUMNS)
    for col in ("first_nonfinite_loss_step", "first_nonfinite_grad_step", "first_nonfinite_param_step",
                "first_nonfinite_step", "first_nonfinite_epoch", "first_dropped_step"):
        summary[col] = summary[col].astype("Int64")
    return KFoldResult(config=config, history=history, epochs=epochs_df, summary=summary,
                       param_grad_norms=pd.concat(pgn, ignore_index=True) if pgn else pd.DataFrame(),
                       warnings=msgs, run_dir=run_dir, models=models)
