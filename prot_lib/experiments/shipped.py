"""Sweeps too long for a chapter: read their shipped rows, and check a live re-run against them.

A sweep spec that takes longer than a page may spend (``python -m prot_lib sweep NAME``) is run once and
shipped by ``scripts/ship_sweep.py`` as ``data/sweeps/STEM.csv`` (one row per fold run, the columns of
:data:`~prot_lib.experiments.cells.ROW_COLUMNS` without ``cell`` and ``worker``) and ``STEM.json`` (the
spec, the commit and source fingerprint that ran it, the command, how many cells were finished). A
chapter reads the rows with :func:`load_shipped`, re-runs a few of the same cells with today's code,
and :func:`compare_to_shipped` checks that the re-run reproduces them: the same fate for every fold run,
the same RMSE ratio within a tolerance. The shipped file is then evidence, not a claim.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import numpy as np
import pandas as pd

from ..data.tables import data_dir

__all__ = ["ShippedSweep", "ShippedMismatch", "load_shipped", "compare_to_shipped"]

#: columns every shipped sweep has (besides its labels): what :func:`compare_to_shipped` compares
_REQUIRED = ("seed", "fold", "fate", "rmse_ratio", "nonfinite", "wall_s")


class ShippedMismatch(AssertionError):
    """A live re-run does not reproduce the shipped rows (the message names each row that differs).

    An ``AssertionError``: in a notebook it fails the cell exactly as a failed ``assert`` does."""


@dataclass
class ShippedSweep:
    """A shipped sweep (:func:`load_shipped`).

    Attributes:
        rows: one row per fold run (the CSV as written by ``scripts/ship_sweep.py``).
        meta: the JSON beside it: ``spec``, ``cells_done``, ``cells_total``, ``fold_runs``, ``missing``,
            ``source`` (prot_lib's source fingerprint), ``torch``, ``command``, and where recorded
            ``commit``, ``wall_s`` (seconds the sweep took) and ``machine``.
        path: the CSV's path.
    """

    rows: pd.DataFrame
    meta: Dict[str, Any] = field(repr=False)
    path: Path

    @property
    def complete(self) -> bool:
        """Every cell of the spec finished (a sweep stopped early ships what it has, and says so)."""
        return self.meta.get("cells_done") == self.meta.get("cells_total") and not self.meta.get("missing")

    def caption(self) -> str:
        """One line for a table caption: fold runs, file, commit, and what the sweep cost, e.g.
        ``"60 fold runs, data/sweeps/x.csv (commit 5908925, 1865 s)"``."""
        bits = [f"commit {self.meta['commit']}" if self.meta.get("commit") else None,
                f"{self.meta['wall_s']:.0f} s" if self.meta.get("wall_s") else None]
        where = ", ".join(b for b in bits if b)
        return f"{len(self.rows)} fold runs, data/sweeps/{self.path.name}" + (f" ({where})" if where else "")


def load_shipped(stem: str, folder: Optional[Path] = None) -> ShippedSweep:
    """Read ``STEM.csv`` and ``STEM.json`` from ``data/sweeps/`` (or ``folder``).

    Args:
        stem: the file name without suffix, e.g. ``"ishigami_ablation_seeds0-1"``.
        folder: where the files are (default: ``data_dir() / "sweeps"``, :func:`prot_lib.data.tables.data_dir`).

    Raises:
        FileNotFoundError: either file missing (names the path).
        ValueError: the CSV lacks a required column, or the JSON is not an object (names the file and
            the column or key).
    """
    folder = Path(folder) if folder is not None else data_dir() / "sweeps"
    csv, meta_path = folder / f"{stem}.csv", folder / f"{stem}.json"
    for p in (csv, meta_path):
        if not p.is_file():
            raise FileNotFoundError(f"{p}: no such shipped sweep file (ship one with scripts/ship_sweep.py)")
    rows = pd.read_csv(csv)
    missing = [c for c in _REQUIRED if c not in rows.columns]
    if missing:
        raise ValueError(f"{csv}: missing column(s) {missing} (a shipped sweep has {list(_REQUIRED)})")
    meta = json.loads(meta_path.read_text())
    if not isinstance(meta, dict) or "spec" not in meta:
        raise ValueError(f"{meta_path}: expected a JSON object with key 'spec'")
    return ShippedSweep(rows=rows, meta=meta, path=csv)


def compare_to_shipped(live: pd.DataFrame, shipped: pd.DataFrame, on: Sequence[str], rtol: float = 0.02,
                       value: str = "rmse_ratio") -> pd.DataFrame:
    """Check that every live fold run reproduces its shipped row; return them side by side.

    A live row reproduces its shipped row when the fate is the same (``fate``, :mod:`prot_lib.training.fate`)
    and ``value`` agrees within ``rtol`` (relative; two NaNs agree: a dead fold has no ratio). Training
    on the CPU is deterministic for a given torch build, so a difference means other code or another
    build, which the shipped JSON names.

    Args:
        live: rows of today's run (:data:`~prot_lib.experiments.cells.ROW_COLUMNS`), a subset of the sweep.
        shipped: the shipped rows (:attr:`ShippedSweep.rows`).
        on: the columns that identify a fold run in both, e.g. ``["dataset", "fix", "fold"]``.
        rtol: relative tolerance of ``value``.
        value: the number compared besides the fate.

    Returns:
        the live rows merged with their shipped rows (shipped columns suffixed ``_shipped``), plus
        ``rel_diff`` (abs(live / shipped - 1) of ``value``; 0 where both are NaN).

    Raises:
        ShippedMismatch: a live row with no shipped row, or whose fate or ``value`` differs (names each row).
        KeyError: a column of ``on`` missing from either frame.
    """
    on = list(on)
    for name, df in (("live", live), ("shipped", shipped)):
        absent = [c for c in on + ["fate", value] if c not in df.columns]
        if absent:
            raise KeyError(f"{name} rows lack column(s) {absent}")
    keys = lambda df: df[on].astype(str).agg("/".join, axis=1)  # noqa: E731  (lr 0.02 and 2e-2 print alike)
    left, right = live.assign(_key=keys(live)), shipped.assign(_key=keys(shipped))
    if right["_key"].duplicated().any():
        raise ShippedMismatch(f"the shipped rows are not unique on {on}")
    merged = left.merge(right.drop(columns=on), on="_key", how="left", suffixes=("", "_shipped"), indicator=True)
    problems = [f"{k}: not in the shipped sweep" for k in merged.loc[merged["_merge"] == "left_only", "_key"]]
    both = merged[merged["_merge"] == "both"]
    a, b = both[value].astype(float).to_numpy(), both[f"{value}_shipped"].astype(float).to_numpy()
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.where(np.isnan(a) & np.isnan(b), 0.0, np.abs(a / b - 1.0))
    merged.loc[both.index, "rel_diff"] = rel
    for (_, r), d in zip(both.iterrows(), rel):
        if r["fate"] != r["fate_shipped"]:
            problems.append(f"{r['_key']}: fate {r['fate']} here, {r['fate_shipped']} shipped")
        elif not d <= rtol:  # NaN (one side NaN) fails too
            problems.append(f"{r['_key']}: {value} {r[value]:.4g} here, {r[f'{value}_shipped']:.4g} shipped")
    if problems:
        raise ShippedMismatch(f"{len(problems)} of {len(live)} live fold runs differ from the shipped sweep ("
                              + "/".join(on) + "): " + "; ".join(problems))
    return merged.drop(columns=["_key", "_merge"])
