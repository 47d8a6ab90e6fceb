"""Ablation of the recommended configuration: each part alone, each part left out, and simpler alternatives.

The recommendation (:mod:`prot_lib.experiments.recommended`) switches on several fixes at once. Which of
them does the work? :func:`ablation_configs` derives, from the same YAML files, one configuration per
variant:

- ``recommended``: every part;
- ``without <part>``: every part but one (that part's keys take the reproduction's values);
- ``<part> alone``: the shipped reproduction plus that part only;
- ``reproduction``: no part;
- any ``extra`` variants the caller names: dotted overrides on the reproduction (e.g. the simplest
  alternative, a lower learning rate alone), or on the recommendation with ``from: recommended`` (e.g. the
  recommendation at 3x and 10x its learning rate: its margin to the edge).

The parts (:data:`PARTS`) group the recommendation's keys by the fix they belong to. The fail-fast keys
(``training.on_nonfinite: stop``, ``training.data_guard``) are set to "continue" / off in every variant
(:data:`NEUTRAL`): they do not change a finite step, and a stopped fold could not show its fate at the
end of training, which is what the ablation compares.

:func:`ablation_sweep` runs every (variant, seed, fold) as a cell of the experiments engine;
:func:`ablation_table` reads the rows: per variant, how many folds went non-finite, died or blew up,
and medians of the fit over folds and seeds, dead folds counted as failures rather than dropped.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence

import pandas as pd

from ..training.config import ConfigError, RunConfig, reproduction_config
from ..training.fate import fate_counts
from .cells import Cell, grid_cells
from .engine import run_cells
from .recommended import recommended_overrides

__all__ = ["PARTS", "NEUTRAL", "flatten_keys", "ablation_configs", "ablation_cells", "ablation_sweep", "ablation_table"]

#: part -> the dotted key prefixes of the recommendation it owns
PARTS: Dict[str, tuple] = {
    "normalize": ("data.normalize", "training.mask_missing_targets"),
    "postnorm": ("model.norm", "model.norm_position", "model.residual"),
    "lr": ("training.lr", "training.max_epochs"),
    "warmup": ("training.warmup",),
    "clip": ("training.gradient_clip_val", "training.gradient_clip_algorithm", "training.clip_via"),
}
#: set in every variant: the fail-fast switches off, so that a failing fold trains to its end
NEUTRAL: Dict[str, Any] = {"training.on_nonfinite": "continue", "training.data_guard": False}


def flatten_keys(nested: Mapping[str, Any], prefix: str = "") -> Dict[str, Any]:
    """``{"training": {"warmup": {"enabled": True}}}`` -> ``{"training.warmup.enabled": True}``."""
    out: Dict[str, Any] = {}
    for key, value in nested.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten_keys(value, path + "."))
        else:
            out[path] = value
    return out


def _owned(key: str, part: str) -> bool:
    return any(key == p or key.startswith(p + ".") for p in PARTS[part])


def ablation_configs(dataset: str, parts: Optional[Sequence[str]] = None,
                     extra: Optional[Mapping[str, Mapping[str, Any]]] = None) -> Dict[str, RunConfig]:
    """The ablation's variants for ``dataset``, by label, in table order.

    Args:
        dataset: a shipped dataset (its reproduction is the base of every variant).
        parts: the parts to ablate (default: every part of :data:`PARTS` the recommendation sets a key of).
        extra: further variants, label -> dotted overrides applied to the reproduction (e.g.
            ``{"lr 1e-2 alone": {"training.lr": 1e-2}}``), or to the recommendation when the mapping holds
            ``"from": "recommended"``.

    Returns:
        ``{"recommended": ..., "without <part>": ..., "<part> alone": ..., "reproduction": ..., **extra}``;
        every config has :data:`NEUTRAL` applied and its name set to ``<dataset>_ablation_<label>``.

    Raises:
        ConfigError: an unknown part, dataset, or a bad override (names the key).
    """
    rec = flatten_keys(recommended_overrides(dataset))
    present = [p for p in PARTS if any(_owned(k, p) for k in rec)]
    parts = list(present if parts is None else parts)
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        raise ConfigError(f"unknown ablation parts {unknown}; valid: {', '.join(PARTS)}")
    base = reproduction_config(dataset)

    def make(label: str, keys: Mapping[str, Any]) -> RunConfig:
        name = f"{dataset}_ablation_{label.replace(' ', '_')}"
        return base.updated({**dict(keys), **NEUTRAL, "name": name})

    variants = {"recommended": make("recommended", rec)}
    for part in parts:
        variants[f"without {part}"] = make(f"without {part}", {k: v for k, v in rec.items() if not _owned(k, part)})
    for part in parts:
        variants[f"{part} alone"] = make(f"{part} alone", {k: v for k, v in rec.items() if _owned(k, part)})
    variants["reproduction"] = make("reproduction", {})
    for label, keys in (extra or {}).items():
        keys = dict(keys)
        start = keys.pop("from", "reproduction")
        if start not in ("reproduction", "recommended"):
            raise ConfigError(f"ablation variant {label!r}: from: {start!r}; valid: reproduction, recommended")
        variants[label] = make(label, {**(rec if start == "recommended" else {}), **keys})
    return variants


def ablation_cells(dataset: str, seeds: Iterable[Optional[int]], folds: Optional[Sequence[int]] = None,
                   parts: Optional[Sequence[str]] = None, extra: Optional[Mapping[str, Mapping[str, Any]]] = None,
                   variants: Optional[Sequence[str]] = None, max_steps: int = -1) -> List[Cell]:
    """One cell per (variant, seed, fold) of :func:`ablation_configs`, labelled ``dataset`` and, in ``fix``,
    the variant. Arguments as :func:`ablation_sweep`.

    Raises:
        ConfigError: as :func:`ablation_configs`; an unknown variant label.
    """
    configs = ablation_configs(dataset, parts, extra)
    labels = list(configs) if variants is None else list(variants)
    missing = [v for v in labels if v not in configs]
    if missing:
        raise ConfigError(f"unknown ablation variants {missing}; valid: {', '.join(configs)}")
    cells = grid_cells({v: configs[v] for v in labels}, seeds=list(seeds), folds=folds, split_folds=True,
                       max_steps=max_steps)
    for cell in cells:  # grid_cells labels a custom config by its base label: keep the dataset, name the variant
        cell.labels.update({"dataset": dataset, "fix": cell.labels["dataset"]})
    return cells


def ablation_sweep(dataset: str, seeds: Iterable[int], folds: Optional[Sequence[int]] = None,
                   parts: Optional[Sequence[str]] = None, extra: Optional[Mapping[str, Mapping[str, Any]]] = None,
                   variants: Optional[Sequence[str]] = None, max_steps: int = -1, **engine: Any) -> pd.DataFrame:
    """Train every (variant, seed, fold) of :func:`ablation_configs` as its own cell; returns the rows
    (:data:`~prot_lib.experiments.cells.ROW_COLUMNS`) with the variant's label in ``fix`` and
    ``variant``.

    Args:
        dataset, parts, extra: as :func:`ablation_configs`.
        seeds: ``training.seed`` values (each fold re-seeds with ``seed + fold``).
        folds: fold indices (None: all ``k_fold``).
        variants: the labels to run (default: all), in that order.
        max_steps: optimizer steps per fold (-1: the config's epochs).
        **engine: passed to :func:`~prot_lib.experiments.engine.run_cells` (``engine``, ``n_jobs``, ``out``,
            ``progress``, ``known``).

    Raises:
        ConfigError: as :func:`ablation_configs`; an unknown variant label.
    """
    cells = ablation_cells(dataset, seeds, folds, parts, extra, variants, max_steps)
    engine.setdefault("desc", f"ablation {dataset}")
    rows = run_cells(cells, **engine)
    return rows.assign(variant=rows["fix"])


#: :func:`~prot_lib.training.fate.fate_counts` column -> its name in :func:`ablation_table` (this table's
#: "live" folds are fate_counts' *usable* ones: neither dead nor blown up)
_ABLATION_COUNTS = {
    "n_folds": "n_folds", "n_nonfinite": "nonfinite", "n_dead": "dead", "n_blown_up": "blown_up",
    "median_rmse_ratio": "median_rmse_ratio", "median_rmse_ratio_usable": "median_rmse_ratio_live",
    "worst_rmse_ratio_usable": "worst_rmse_ratio_live",
}


def ablation_table(rows: pd.DataFrame) -> pd.DataFrame:
    """Per variant (rows of :func:`ablation_sweep`, or a CSV of them, in their order): the folds' fates and
    medians.

    Columns: ``lr`` (AdamW, per optimizer step); ``n_folds`` (folds x seeds run); ``nonfinite`` (folds with
    a non-finite loss, gradient or weight at some step); ``dead`` (ending with a non-finite weight or
    validation metric); ``blown_up`` (finite, but last val RMSE >= 2 target std); ``median_rmse_ratio``
    (last val RMSE / target std, median over ALL folds with dead ones counted as +inf, so a variant that
    kills half its folds scores inf: the ranking number); ``median_rmse_ratio_live`` (the same over the
    folds neither dead nor blown up); ``worst_rmse_ratio_live`` (their maximum).

    Units: RMSE ratios are dimensionless (1.0 = the mean predictor). The counts and medians are
    :func:`prot_lib.training.fate.fate_counts`' (``n_nonfinite``, ``median_rmse_ratio_usable``, ...)
    under this table's names.

    Raises:
        KeyError: a row lacks a fate column, or both ``variant`` and ``fix``. ValueError: an unknown
        ``fate`` (names the row).
    """
    key = "variant" if "variant" in rows else "fix"  # a shipped CSV keeps only ``variant``
    t = fate_counts(rows, key, columns=_ABLATION_COUNTS)  # one dataset per table
    t.index.name = "variant"
    # the variant's lr: its first row's (a variant is one config); NaN when the rows carry none
    lr = math.nan
    if "lr" in rows:
        lr = pd.to_numeric(rows["lr"], errors="coerce").astype(float)
        lr = lr.groupby(rows[key], sort=False).agg(lambda s: s.iloc[0])
    t.insert(0, "lr", lr)
    return t
