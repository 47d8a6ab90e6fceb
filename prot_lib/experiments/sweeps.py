"""The book's named sweeps, run from their YAML specs: ``python -m prot_lib sweep NAME``.

:func:`run_sweep` loads ``prot_lib/configs/sweeps/<NAME>.yaml`` (:mod:`prot_lib.experiments.specs`),
runs its cells through the engine (:func:`~prot_lib.experiments.engine.run_cells`, resuming from
``out``), and reads the rows with the analysis of its ``kind``:

=================  =========================================================================
kind               tables (:attr:`SweepResult.tables`)
=================  =========================================================================
``fix-matrix``     ``fix_table`` (:func:`~prot_lib.experiments.fix_matrix.fix_table`)
``stability-map``  ``clip_map`` (:func:`~prot_lib.experiments.stability.summarize_clip_map`),
                   ``needs_tuning``, ``edge``, ``stable_lr`` (per dataset and setting)
``clip-sweep``     ``clip_sweep`` (:func:`~prot_lib.experiments.stability.clip_sweep_table`)
``seed-rates``     ``per_seed``, and the rates in :attr:`SweepResult.findings`
                   (:func:`~prot_lib.experiments.seeds.seed_rates`)
``ablation``       ``ablation`` (:func:`~prot_lib.experiments.ablation.ablation_table`, per dataset)
=================  =========================================================================
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Union

import pandas as pd

from ..training import run_cache
from ..utils.io import atomic_write_text
from .ablation import ablation_table
from .engine import run_cells
from .fix_matrix import fix_table
from .seeds import seed_rates
from .specs import SweepSpec, load_spec, spec_cells
from .stability import (clip_sweep_table, describe_stability, edge_table, needs_tuning_table, stability_edge,
                        stability_pivot, summarize_clip_map)

__all__ = ["SweepResult", "run_sweep", "analyse", "default_out"]


@dataclass
class SweepResult:
    """What :func:`run_sweep` returns.

    Attributes:
        spec: the validated spec (``--quick`` already merged in).
        rows: one row per (cell, fold) (:data:`~prot_lib.experiments.cells.ROW_COLUMNS`).
        tables: the analysis of the spec's ``kind``, by name.
        findings: JSON-ready numbers and sentences of the analysis (e.g. the seed rates).
        quick: whether the spec's ``quick`` section was applied.
        engine: the engine that ran the cells.
        wall_s: seconds for the whole sweep (cells found on disk included at no cost).
        out: the folder the results were written to.
    """

    spec: SweepSpec
    rows: pd.DataFrame
    tables: Dict[str, pd.DataFrame] = field(default_factory=dict)
    findings: Dict[str, Any] = field(default_factory=dict)
    quick: bool = False
    engine: str = "local"
    wall_s: float = math.nan
    out: Optional[Path] = None

    def write(self, out: Union[str, Path]) -> Path:
        """``<out>/rows.csv``, ``<out>/<table>.csv`` per table, ``<out>/findings.json`` (spec, findings,
        provenance). The per-cell results are already in ``<out>/cells/``. Returns ``out``."""
        out = Path(out)
        atomic_write_text(out / "rows.csv", self.rows.to_csv(index=False))
        for name, table in self.tables.items():
            atomic_write_text(out / f"{name}.csv", table.to_csv())
        meta = {"spec": self.spec.model_dump(), "quick": self.quick, "engine": self.engine,
                "wall_s": round(self.wall_s, 1), "n_cells": int(self.rows["cell"].nunique()),
                "n_rows": len(self.rows), "workers": sorted(self.rows["worker"].unique().tolist()),
                "source": run_cache.source_fingerprint(), "findings": self.findings}
        atomic_write_text(out / "findings.json", json.dumps(meta, indent=1, default=str))
        return out

    def report(self) -> str:
        """The tables and findings as text (what the CLI prints)."""
        lines = [f"sweep {self.spec.name}{' (quick)' if self.quick else ''}: {self.spec.description}",
                 f"{self.rows['cell'].nunique()} cells, {len(self.rows)} fold runs, engine {self.engine}, "
                 f"{self.rows['worker'].nunique()} worker(s), {self.wall_s:.1f} s"]
        with pd.option_context("display.width", 160, "display.max_columns", 30, "display.precision", 3):
            for name, table in self.tables.items():
                lines += ["", f"{name}:", table.to_string()]
        for key, value in self.findings.items():
            lines += ["", f"{key}: {json.dumps(value, default=str) if not isinstance(value, str) else value}"]
        return "\n".join(lines)


def analyse(spec: SweepSpec, rows: pd.DataFrame) -> tuple:
    """The tables and findings of ``spec.kind`` from a sweep's rows: ``(tables, findings)``."""
    tables: Dict[str, pd.DataFrame] = {}
    findings: Dict[str, Any] = {}
    if spec.kind == "fix-matrix":
        tables["fix_table"] = fix_table(rows).set_index(["dataset", "fix"])
    elif spec.kind == "stability-map":
        summary = summarize_clip_map(rows)
        tables["clip_map"] = summary.set_index(["dataset", "lr", "setting"])
        tables["needs_tuning"] = needs_tuning_table(summary)
        tables["edge"] = edge_table(rows)
        pivots = {ds: stability_pivot(g) for ds, g in rows.groupby("dataset", sort=False)}
        tables["stable_lr"] = pd.DataFrame({ds: stability_edge(p) for ds, p in pivots.items()}).T
        findings["stability"] = [describe_stability(p, ds) for ds, p in pivots.items()]
    elif spec.kind == "clip-sweep":
        tables["clip_sweep"] = clip_sweep_table(rows)
    elif spec.kind == "seed-rates":
        per_seed, rates = [], {}
        for (ds, fix), g in rows.groupby(["dataset", "fix"], sort=False):
            ps, r = seed_rates(g)
            per_seed.append(ps.assign(dataset=ds, fix=fix))
            rates[f"{ds}/{fix}"] = r
        tables["per_seed"] = pd.concat(per_seed, ignore_index=True).set_index(["dataset", "fix", "seed"])
        findings["rates"] = rates
    elif spec.kind == "ablation":
        tables["ablation"] = pd.concat({ds: ablation_table(g) for ds, g in rows.groupby("dataset", sort=False)},
                                       names=["dataset"])
    return tables, findings


def default_out(name: str, quick: bool = False) -> Path:
    """``runs/sweeps/<name>`` (``<name>-quick`` for a quick sweep), relative to the working folder."""
    return Path("runs") / "sweeps" / (f"{name}-quick" if quick else name)


def run_sweep(name: Union[str, Path], quick: bool = False, *, engine: Optional[str] = None,
              scheduler: Optional[str] = None, n_jobs: Optional[int] = None, out: Union[str, Path, None] = None,
              progress: Optional[bool] = None) -> SweepResult:
    """Run a named sweep (or a spec file) through the engine and analyse it.

    Args:
        name: a shipped spec (``fix-matrix``, ``stability-map``, ``clip-sweep``, ``seed-rates``) or the
            path of a spec YAML file.
        quick: merge the spec's ``quick`` section (a sweep of about a minute on 2 cores).
        engine, scheduler, n_jobs, progress: as :func:`~prot_lib.experiments.engine.run_cells`.
        out: folder for the per-cell results (resume) and the tables (default :func:`default_out`).

    Returns:
        :class:`SweepResult` (also written to ``out``).

    Raises:
        ConfigError: no such spec, or an invalid one (names the file and key).
    """
    spec = load_spec(name, quick=quick)
    engine = engine or os.environ.get("PROT_LIB_ENGINE") or "local"
    out = Path(out) if out is not None else default_out(spec.name, quick)
    t0 = time.perf_counter()
    rows = run_cells(spec_cells(spec), engine=engine, scheduler=scheduler, n_jobs=n_jobs, out=out,
                     progress=progress, desc=spec.name)
    tables, findings = analyse(spec, rows)
    result = SweepResult(spec=spec, rows=rows, tables=tables, findings=findings, quick=quick,
                         engine=engine, wall_s=time.perf_counter() - t0, out=out)
    result.write(out)
    return result
