"""How stable is training over learning rate x clip setting (x seed)? The stability map, the clip
sweep, and the tables that read them.

- :func:`stability_map` (chapters 9 and 10): every (base, lr, clip setting) cell trains some folds; the
  clip settings are labels (:data:`~prot_lib.experiments.cells.CLIP_SETTINGS`: none, three fixed
  norms, AutoClip, ZClip). Does clipping make a too-large learning rate safe, and does an adaptive
  algorithm remove the need to tune the clip value?
- :func:`clip_sweep` (chapter 4): one learning rate, several clip values, several seeds.

Both are grids of :func:`~prot_lib.experiments.cells.grid_cells` run by
:func:`~prot_lib.experiments.engine.run_cells`; both return its rows
(:data:`~prot_lib.experiments.cells.ROW_COLUMNS`), in which a fold "went non-finite" (``nonfinite``)
exactly when its fate says so (``first_nonfinite_step`` set: a loss, gradient or weight was inf/NaN at
some step). The tables below only read those rows.

Reading a map: a fixed clip value "needs tuning" when the best value differs between rows (learning
rates, datasets), or a value that is right in one row diverges or trains badly in another; an adaptive
algorithm removes the need when its one default setting is finite wherever some fixed value is, and
close to the best RMSE of its row (:func:`summarize_clip_map`'s ``rmse_ratio``).
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

import numpy as np
import pandas as pd

from .cells import CLIP_SETTINGS, BaseLike, clip_settings, grid_cells
from .engine import run_cells

__all__ = [
    "stability_map", "clip_sweep", "stability_pivot", "stability_edge", "describe_stability", "summarize_clip_map",
    "needs_tuning_table", "edge_table", "clip_sweep_table",
]

#: the setting that means "no clipping" in every table here
REFERENCE = "none"


def _per_base(value, label):
    return value[label] if isinstance(value, Mapping) else value


def stability_map(base: Union[BaseLike, Mapping[str, BaseLike]], lrs: Union[Sequence[float], Mapping[str, Sequence[float]]],
                  settings: Iterable[str] = CLIP_SETTINGS,
                  folds: Union[Sequence[int], Mapping[str, Sequence[int]]] = (0,), max_steps: int = -1, *,
                  fix: Optional[str] = None, seed: Optional[int] = None, extend_epochs: bool = False,
                  overrides: Optional[Mapping[str, Any]] = None, **engine: Any) -> pd.DataFrame:
    """Train every (base, lr, clip setting) cell on ``folds`` and return one row per fold run.

    Args:
        base: a dataset name (its shipped reproduction), a ``RunConfig``, or {label: either}, e.g.
            ``{"ishigami": reproduction_config("ishigami"), "dyconex": reproduction_config("dyconex", "normalize")}``.
        lrs: ``training.lr`` values (AdamW, per optimizer step), or {label: values}.
        settings: clip setting labels (:func:`~prot_lib.experiments.cells.setting_overrides`), e.g.
            ``clip_settings([None, 0.1, 1.0], ["autoclip", "zclip"])``.
        folds: fold indices per cell, or {label: fold indices}.
        max_steps: optimizer steps per fold (-1: the config's ``max_epochs``).
        fix: a fix overlay applied on top of every base (e.g. "normalize").
        seed: ``training.seed`` of every cell (None: the base's).
        extend_epochs: raise ``max_epochs`` so a fold can reach ``max_steps`` (Dyconex trains 45 steps).
        overrides: further dotted overrides for every cell.
        **engine: passed to :func:`~prot_lib.experiments.engine.run_cells` (``engine``, ``n_jobs``,
            ``scheduler``, ``out``, ``progress``).

    Returns:
        the rows (:data:`~prot_lib.experiments.cells.ROW_COLUMNS`), in grid order.

    Raises:
        ConfigError: an unknown setting label, dataset or fix.
    """
    bases = base if isinstance(base, Mapping) else {base if isinstance(base, str) else base.data.name: base}
    entries = {label: {**({"config": b} if not isinstance(b, str) else {"dataset": b}),
                       "lrs": list(_per_base(lrs, label)), "folds": list(_per_base(folds, label))}
               for label, b in bases.items()}
    cells = grid_cells(entries, fixes=(fix,), settings=list(settings), seeds=(seed,), max_steps=max_steps,
                       extend_epochs=extend_epochs, overrides=overrides)
    engine.setdefault("desc", "stability map")
    return run_cells(cells, **engine)


def clip_sweep(dataset: str = "ishigami", lr: Optional[float] = None,
               clip_values: Sequence[Optional[float]] = (None, 0.1, 1.0, 10.0), max_steps: int = 150,
               seeds: Iterable[int] = (0,), folds: Iterable[int] = (0,), fix: str = "none",
               overrides: Optional[Mapping[str, Any]] = None, **engine: Any) -> pd.DataFrame:
    """One run per (clip value, seed) over ``folds`` (chapter 4's sweep), through the engine.

    Args:
        clip_values: ``gradient_clip_val`` values under "norm"; None (or 0) is clipping off.
        lr, max_steps, fix, overrides: as :func:`~prot_lib.experiments.quick.quick_config`.
        **engine: passed to :func:`~prot_lib.experiments.engine.run_cells`.

    With clipping off, seed 0, all folds and ``max_steps=-1`` a cell is exactly the shipped
    reproduction, read back from ``PROT_LIB_CACHE`` when a chapter ran it.

    Returns:
        the rows (:data:`~prot_lib.experiments.cells.ROW_COLUMNS`); ``setting`` is "none" or "norm c".
    """
    cells = grid_cells({dataset: {}}, fixes=(fix,), lrs=(lr,), settings=clip_settings(clip_values),
                       seeds=list(seeds), folds=list(folds), max_steps=max_steps, extend_epochs=True,
                       overrides=overrides)
    engine.setdefault("desc", "clip sweep")
    return run_cells(cells, **engine)


def clip_sweep_table(rows: pd.DataFrame) -> pd.DataFrame:
    """Per clip setting (in the order run): ``runs`` (fold runs), ``nonfinite_rate`` (share that went
    non-finite), ``median_first_nonfinite_step``, ``clipped_fraction`` (mean share of steps clipped),
    ``max_loss`` (largest finite raw loss of any run)."""
    g = rows.assign(first=rows["first_nonfinite_step"].astype(float)).groupby("setting", sort=False)
    return g.agg(runs=("nonfinite", "size"), nonfinite_rate=("nonfinite", "mean"),
                 median_first_nonfinite_step=("first", "median"), clipped_fraction=("clipped_fraction", "mean"),
                 max_loss=("max_loss", "max"))


# -------------------------------------------------------------------------------- reading a map
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
    clipping; norm 1 moves it to lr 0.02; every setting fails at lr 0.05".

    The edge of a setting is :func:`stability_edge`; a clip setting "moves" the edge when its edge is
    above the one of "none", "lowers" it when every clip setting's edge is below."""
    if (pivot == 0).all().all():
        return f"{dataset}: every cell stays finite"
    edge = stability_edge(pivot)
    fmt = lambda v: "no lr" if math.isnan(v) else f"lr {v:g}"  # noqa: E731
    base = edge.get(REFERENCE, math.nan)
    parts = [f"{dataset}: finite up to {fmt(base)} without clipping" if REFERENCE in edge else dataset]
    others = edge.drop(REFERENCE, errors="ignore").fillna(0.0)  # a setting that fails everywhere: edge 0
    if len(others) and REFERENCE in edge:
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


def summarize_clip_map(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (dataset, lr, setting): ``finite_rate`` (share of folds that never went non-finite),
    ``mean_rmse`` over the folds (inf when any fold went non-finite, so a setting that loses a fold
    cannot look good), ``rmse_ratio`` = mean_rmse / the best mean_rmse of the same (dataset, lr)
    (1.0 = the best setting of its row; inf = lost a fold; NaN = every setting of the row lost a fold),
    ``median_grad_norm``, ``clipped_fraction`` and ``median_threshold`` over the folds."""
    d = df.copy()
    d["finite"] = ~d["nonfinite"]
    d["rmse_or_inf"] = d["final_val_rmse"].where(d["finite"] & d["final_val_rmse"].notna(), np.inf)
    g = d.groupby(["dataset", "lr", "setting"], sort=False)
    out = g.agg(finite_rate=("finite", "mean"), mean_rmse=("rmse_or_inf", "mean"),
                median_grad_norm=("median_grad_norm", "median"),
                clipped_fraction=("clipped_fraction", "mean"), median_threshold=("median_threshold", "median"))
    out = out.reset_index()
    best = out.groupby(["dataset", "lr"])["mean_rmse"].transform("min")
    out["rmse_ratio"] = (out["mean_rmse"] / best).where(np.isfinite(best))
    return out


def needs_tuning_table(summary: pd.DataFrame, tolerance: float = 1.10, reference: str = REFERENCE) -> pd.DataFrame:
    """Per setting, over the *stable rows*, the (dataset, lr) rows in which the ``reference`` setting (no
    clipping) kept every fold finite, so that only the quality of training is in question: in how many
    rows it also kept every fold finite and came within ``tolerance`` of the row's best mean RMSE
    (``good_rows``), and its worst ``rmse_ratio`` there. Sorted best first. A setting good in every
    stable row needs no tuning of its value over this grid."""
    s = summary.copy()
    ref = s[s["setting"] == reference].set_index(["dataset", "lr"])["finite_rate"]
    stable = s.set_index(["dataset", "lr"]).index.map(lambda k: ref.get(k, 0.0) == 1.0)
    s = s[np.asarray(stable, dtype=bool)]
    s["good"] = (s["finite_rate"] == 1.0) & (s["rmse_ratio"] <= tolerance)
    t = s.groupby("setting", sort=False).agg(good_rows=("good", "sum"), stable_rows=("good", "size"),
                                              worst_rmse_ratio=("rmse_ratio", "max"))
    return t.sort_values(["good_rows", "worst_rmse_ratio"], ascending=[False, True])


def edge_table(df: pd.DataFrame, reference: str = REFERENCE) -> pd.DataFrame:
    """Per setting, over the *edge rows*, the (dataset, lr) rows in which the ``reference`` setting lost
    a fold but some setting kept at least one: how many of its fold runs stayed finite
    (``finite_folds`` of ``folds``). This is where clipping could make the difference between a run
    that trains and one that dies."""
    d = df.assign(finite=~df["nonfinite"])
    g = d.groupby(["dataset", "lr"])
    some_alive = g["finite"].transform("any")
    ref_rate = d[d["setting"] == reference].groupby(["dataset", "lr"])["finite"].mean()
    ref_lost = d.set_index(["dataset", "lr"]).index.map(lambda k: ref_rate.get(k, 1.0) < 1.0)
    edge = d[some_alive.to_numpy() & np.asarray(ref_lost, dtype=bool)]
    t = edge.groupby("setting", sort=False).agg(finite_folds=("finite", "sum"), folds=("finite", "size"))
    return t.sort_values("finite_folds", ascending=False, kind="stable")
