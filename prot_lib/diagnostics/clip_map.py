"""A stability map: learning rate x clip setting, on short real runs. Does adaptive clipping remove the
need to tune the clip value?

Each cell trains the given folds of a base config with one learning rate and one clip setting
(:data:`CLIP_SETTINGS`: none, three fixed ``gradient_clip_val`` under "norm", AutoClip and ZClip with the
papers' defaults) and records whether the run stayed finite and its last validation RMSE. Reading the
map: a fixed clip value "needs tuning" when the best value differs between rows (learning rates,
datasets) or a value that is right in one row diverges or trains badly in another; an adaptive
algorithm removes the need when its one default setting is finite wherever some fixed value is, and
close to the best RMSE of its row (:func:`summarize_clip_map` reports that ratio as ``rmse_ratio``).
"""
from __future__ import annotations

import math
from typing import Dict, Iterable, Mapping, Optional, Sequence, Union

import numpy as np
import pandas as pd

#: name -> config overrides; "norm c" is Lightning's Trainer(gradient_clip_val=c)
CLIP_SETTINGS: Dict[str, dict] = {
    "none": {"training.gradient_clip_val": None, "training.gradient_clip_algorithm": "norm"},
    "norm 0.1": {"training.gradient_clip_val": 0.1, "training.gradient_clip_algorithm": "norm"},
    "norm 1": {"training.gradient_clip_val": 1.0, "training.gradient_clip_algorithm": "norm"},
    "norm 10": {"training.gradient_clip_val": 10.0, "training.gradient_clip_algorithm": "norm"},
    "autoclip p10": {"training.gradient_clip_val": None, "training.gradient_clip_algorithm": "autoclip"},
    "zclip": {"training.gradient_clip_val": None, "training.gradient_clip_algorithm": "zclip"},
}

MAP_COLUMNS = ["dataset", "lr", "setting", "fold", "n_steps", "finite", "first_nonfinite_step",
               "final_val_rmse", "median_grad_norm", "clipped_fraction", "median_threshold"]


def clip_stability_map(base_configs: Mapping[str, "RunConfig"],  # noqa: F821
                       lrs: Union[Sequence[float], Mapping[str, Sequence[float]]],
                       settings: Iterable[str] = tuple(CLIP_SETTINGS),
                       folds: Union[Sequence[int], Mapping[str, Sequence[int]]] = (0,),
                       max_steps: int = -1, extra: Optional[Mapping[str, object]] = None) -> pd.DataFrame:
    """Train every (dataset, lr, setting, fold) cell and return one row per fold run.

    Args:
        base_configs: {dataset label: RunConfig}, e.g. ``{"ishigami": reproduction_config("ishigami")}``.
        lrs: learning rates (``training.lr``, per optimizer step), or {dataset label: learning rates}.
        settings: names from :data:`CLIP_SETTINGS`.
        folds: fold indices per cell, or {dataset label: fold indices}.
        max_steps: optimizer steps per fold (-1: the config's ``max_epochs``).
        extra: further overrides applied to every cell (dotted keys).

    Returns:
        DataFrame with :data:`MAP_COLUMNS`: ``finite`` (no non-finite loss, gradient or parameter in the
        fold), ``first_nonfinite_step`` (NaN if none), ``final_val_rmse`` (target units, NaN when the
        run died), ``median_grad_norm`` (median finite pre-clip total norm), ``clipped_fraction``
        (steps whose post-clip norm is < 99.9 % of the pre-clip norm),
        ``median_threshold`` (median ``clip_threshold``; NaN without clipping).

    Raises:
        KeyError: an unknown setting name.
    """
    from ..training import run_kfold  # late: prot_lib.training imports prot_lib.diagnostics

    rows = []
    settings = list(settings)
    for label, base in base_configs.items():
        label_folds = [int(f) for f in (folds[label] if isinstance(folds, Mapping) else folds)]
        for lr in (lrs[label] if isinstance(lrs, Mapping) else lrs):
            for name in settings:
                overrides = {**CLIP_SETTINGS[name], "training.lr": float(lr), **(extra or {})}
                cfg = base.updated({**overrides, "name": f"{base.name}_lr{lr:g}_{name.replace(' ', '')}"})
                res = run_kfold(cfg, folds=label_folds, max_steps=max_steps, keep_models=False, progress=False)
                for fold in label_folds:
                    s = res.fold_summary(int(fold))
                    h = res.history[res.history["fold"] == fold]
                    firsts = [s[k] for k in ("first_nonfinite_loss_step", "first_nonfinite_grad_step",
                                             "first_nonfinite_param_step") if s[k] is not None]
                    before = h["grad_norm_before_clip"].to_numpy(float)
                    after = h["grad_norm_after_clip"].to_numpy(float)
                    ok = np.isfinite(before) & np.isfinite(after) & (before > 0)
                    thr = h["clip_threshold"].to_numpy(float) if "clip_threshold" in h else np.array([])
                    thr = thr[np.isfinite(thr)]
                    rows.append({
                        "dataset": label, "lr": float(lr), "setting": name, "fold": int(fold),
                        "n_steps": len(h), "finite": not firsts,
                        "first_nonfinite_step": min(firsts) if firsts else math.nan,
                        "final_val_rmse": s["final_val_rmse"] if s["final_val_rmse"] is not None else math.nan,
                        "median_grad_norm": float(np.median(before[np.isfinite(before)]))
                        if np.isfinite(before).any() else math.nan,
                        "clipped_fraction": float((after[ok] < 0.999 * before[ok]).mean()) if ok.any() else math.nan,
                        "median_threshold": float(np.median(thr)) if thr.size else math.nan,
                    })
    return pd.DataFrame(rows, columns=MAP_COLUMNS)


def summarize_clip_map(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (dataset, lr, setting): ``finite_rate`` over folds, ``mean_rmse`` over the folds
    (inf when any fold died, so a setting that loses a fold cannot look good), and ``rmse_ratio``
    = mean_rmse / the best mean_rmse of the same (dataset, lr) (1.0 = the best setting of its row;
    inf = lost a fold; NaN = every setting of the row lost a fold)."""
    d = df.copy()
    d["rmse_or_inf"] = d["final_val_rmse"].where(d["finite"] & d["final_val_rmse"].notna(), np.inf)
    g = d.groupby(["dataset", "lr", "setting"], sort=False)
    out = g.agg(finite_rate=("finite", "mean"), mean_rmse=("rmse_or_inf", "mean"),
                median_grad_norm=("median_grad_norm", "median"),
                clipped_fraction=("clipped_fraction", "mean"), median_threshold=("median_threshold", "median"))
    out = out.reset_index()
    best = out.groupby(["dataset", "lr"])["mean_rmse"].transform("min")
    out["rmse_ratio"] = (out["mean_rmse"] / best).where(np.isfinite(best))
    return out


def needs_tuning_table(summary: pd.DataFrame, tolerance: float = 1.10, reference: str = "none") -> pd.DataFrame:
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


def edge_table(df: pd.DataFrame, reference: str = "none") -> pd.DataFrame:
    """Per setting, over the *edge rows*, the (dataset, lr) rows in which the ``reference`` setting lost
    a fold but some setting kept at least one: how many of its fold runs stayed finite
    (``finite_folds`` of ``folds``). This is where clipping could make the difference between a run
    that trains and one that dies."""
    g = df.groupby(["dataset", "lr"])
    some_alive = g["finite"].transform("any")
    ref_rate = df[df["setting"] == reference].groupby(["dataset", "lr"])["finite"].mean()
    ref_lost = df.set_index(["dataset", "lr"]).index.map(lambda k: ref_rate.get(k, 1.0) < 1.0)
    edge = df[some_alive.to_numpy() & np.asarray(ref_lost, dtype=bool)]
    t = edge.groupby("setting", sort=False).agg(finite_folds=("finite", "sum"), folds=("finite", "size"))
    return t.sort_values("finite_folds", ascending=False, kind="stable")


def plot_clip_map(summary: pd.DataFrame, title: Optional[str] = None, max_ratio: float = 2.0):
    """Two heatmaps per dataset (rows: lr, columns: setting): the share of folds that stayed finite,
    and the mean val RMSE relative to the best setting of the row (colour saturates at ``max_ratio``;
    "x": the setting lost a fold, "-": every setting of the row lost a fold)."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    datasets = list(dict.fromkeys(summary["dataset"]))
    n_rows = int(summary.groupby("dataset")["lr"].nunique().sum())
    fig, axes = plt.subplots(len(datasets), 2, figsize=(12, 1.2 + 0.55 * n_rows + 1.2 * len(datasets)), squeeze=False)
    for i, ds in enumerate(datasets):
        d = summary[summary["dataset"] == ds]
        order = list(dict.fromkeys(d["setting"]))
        finite = d.pivot(index="lr", columns="setting", values="finite_rate")[order]
        ratio = d.pivot(index="lr", columns="setting", values="rmse_ratio")[order]
        labels = ratio.apply(lambda col: col.map(lambda v: "-" if pd.isna(v) else ("x" if np.isinf(v) else f"{v:.2f}")))
        finite.index = ratio.index = labels.index = [f"{v:g}" for v in finite.index]
        sns.heatmap(finite, annot=True, fmt=".2f", cmap="rocket", vmin=0, vmax=1, ax=axes[i, 0],
                    cbar_kws={"label": "finite folds"}, linewidths=0.5, linecolor="white")
        sns.heatmap(ratio.replace(np.inf, np.nan).clip(upper=max_ratio), annot=labels, fmt="", cmap="rocket_r",
                    vmin=1, vmax=max_ratio, ax=axes[i, 1], cbar_kws={"label": "RMSE / best of row"},
                    linewidths=0.5, linecolor="white")
        for j, ax in enumerate(axes[i]):
            for (r, c), text in np.ndenumerate(labels.to_numpy()):
                if j == 1 and text in ("x", "-"):
                    ax.text(c + 0.5, r + 0.5, text, ha="center", va="center", color="0.4")
            ax.grid(False)
            ax.set_title(f"{ds}: share of folds finite" if j == 0 else f"{ds}: val RMSE / best of the row")
            ax.set_ylabel("learning rate (per step)")
            ax.set_xlabel("clip setting" if i == len(datasets) - 1 else "")
            ax.tick_params(axis="x", rotation=20)
            ax.tick_params(axis="y", rotation=0)
    if title:
        fig.suptitle(title, fontweight="bold")
    fig.tight_layout()
    return fig
