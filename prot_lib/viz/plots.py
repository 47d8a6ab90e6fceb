"""Plots of the book: curves per fold with the first non-finite step marked, heatmaps, lr curves.

One palette for the whole book (seaborn's "colorblind"); every figure gets a title that states its
finding, axes with units, log scales where values span decades. Non-finite values cannot be drawn on
a log axis: each curve stops at its last finite value and the first non-finite value of the drawn
column is marked with a dashed line and a cross, so a reader sees *where* a run died.

A finding in words (a title) is read from the folds' fates (:mod:`prot_lib.training.fate`, the
``summary`` of a :class:`~prot_lib.training.kfold.KFoldResult`), never re-derived from a curve:
:func:`describe_divergence`.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

PALETTE = "colorblind"
NAN_COLOR = "#d62728"


def set_style() -> None:
    """The book's matplotlib/seaborn style (call once per notebook)."""
    sns.set_theme(context="notebook", style="whitegrid", palette=PALETTE)
    plt.rcParams.update({"figure.dpi": 100, "savefig.dpi": 100, "axes.titleweight": "bold", "figure.figsize": (8, 4)})


def fold_colors(n: int):
    return sns.color_palette(PALETTE, n)


def first_nonfinite_step(df: pd.DataFrame, column: str) -> Optional[int]:
    """First ``step`` whose ``column`` is NaN or +-inf (None if all finite): where to put the mark on a
    drawn curve (a fold's fate is in its summary, :func:`describe_divergence`)."""
    bad = ~np.isfinite(df[column].to_numpy(dtype=float))
    return int(df["step"].to_numpy()[bad][0]) if bad.any() else None


def _summary_of(run) -> pd.DataFrame:
    """The fold summary of a :class:`~prot_lib.training.kfold.KFoldResult`, or the summary itself.

    Raises:
        TypeError: neither (e.g. a per-step history: its fate is in the run's summary, not in a curve).
    """
    summary = getattr(run, "summary", run)
    if not isinstance(summary, pd.DataFrame) or "fate" not in summary or "fold" not in summary:
        raise TypeError("pass a KFoldResult or its summary (the fate columns of prot_lib.training.fate), "
                        "not a per-step history")
    return summary


def _history_and_summary(run) -> Tuple[pd.DataFrame, Optional[pd.DataFrame]]:
    """(history, summary or None) of a KFoldResult, or (the history itself, None)."""
    if isinstance(run, pd.DataFrame):
        return run, None
    return run.history, run.summary


def describe_divergence(run, step_column: str = "first_nonfinite_step") -> str:
    """A finding in words, read from the folds' fates, e.g. "fold 3 diverges at step 120; folds 0-2, 4
    stay finite".

    Args:
        run: a :class:`~prot_lib.training.kfold.KFoldResult` or its ``summary`` (rows may be a subset of
            folds).
        step_column: which first non-finite step counts: ``first_nonfinite_step`` (a loss, gradient or
            weight; the fate's definition of "went non-finite"), or ``first_nonfinite_loss_step``,
            ``first_nonfinite_grad_step``, ``first_nonfinite_param_step``.

    A fold that went non-finite and ended finite (fate "recovered") "recovers"; a finite fold whose fate
    is "blown_up" is named with its validation RMSE in target standard deviations.

    Raises:
        TypeError: ``run`` is a per-step history, not a run or a summary.
    """
    s = _summary_of(run).sort_values("fold")
    bad, ok, blown = [], [], []
    for _, r in s.iterrows():
        fold, step = int(r["fold"]), r[step_column]
        if pd.notna(step):
            bad.append(f"fold {fold} diverges at step {int(step)}" + (" and recovers" if r["fate"] == "recovered" else ""))
        else:
            ok.append(fold)
            if r["fate"] == "blown_up":
                blown.append(f"fold {fold} blows up (val RMSE {r['rmse_ratio']:.1f} target std)")
    if not bad:
        text = "the fold stays finite" if len(ok) == 1 else f"all {len(ok)} folds stay finite"
    else:
        tail = (f"; fold{'s' if len(ok) > 1 else ''} {', '.join(str(f) for f in ok)} "
                f"stay{'s' if len(ok) == 1 else ''} finite") if ok else ""
        text = ", ".join(bad) + tail
    return "; ".join([text, *blown])


def plot_fold_curves(history: pd.DataFrame, column: str = "raw_loss", ax=None, title: Optional[str] = None,
                     ylabel: Optional[str] = None, log: bool = True, mark_column: Optional[str] = None,
                     summary: Optional[pd.DataFrame] = None):
    """One line per fold of ``history[column]`` against ``step``; the first non-finite value marked.

    Args:
        history: a per-step table with ``fold``, ``step`` and ``column`` (as ``KFoldResult.history``).
        column: what to draw, e.g. ``raw_loss``, ``train_loss``, ``grad_norm_before_clip``.
        title: the finding (default: :func:`describe_divergence` of ``summary``, else "<column> per fold").
        mark_column: which column's first non-finite value to mark (default ``column``).
        log: log10 y axis (values that span decades).
        summary: the run's fold summary, for the default title.

    Returns:
        the matplotlib Axes.
    """
    if ax is None:
        _, ax = plt.subplots(figsize=(8, 4))
    folds = sorted(history["fold"].unique())
    colors = dict(zip(folds, fold_colors(len(folds))))
    mark_column = mark_column or column
    for fold in folds:
        g = history[history["fold"] == fold].sort_values("step")
        y = g[column].to_numpy(dtype=float)
        finite = np.isfinite(y) & ((y > 0) if log else True)
        ax.plot(g["step"].to_numpy()[finite], y[finite], color=colors[fold], lw=1.2, label=f"fold {fold}")
        s = first_nonfinite_step(g, mark_column)
        if s is not None:
            ax.axvline(s, color=colors[fold], ls="--", lw=1)
            prev = y[finite & (g["step"].to_numpy() < s)]
            ypos = prev[-1] if len(prev) else (1.0 if log else 0.0)
            ax.plot([s], [ypos], marker="X", ms=11, color=NAN_COLOR, mec="black", zorder=5)
            ax.annotate(f"fold {fold}: first non-finite\nat step {s}", (s, ypos), textcoords="offset points",
                        xytext=(6, 6), fontsize=8, color=NAN_COLOR)
    if log:
        ax.set_yscale("log")
    ax.set_xlabel("optimizer step (within fold)")
    ax.set_ylabel(ylabel or column + (" (log scale)" if log else ""))
    if title is None:
        title = describe_divergence(summary[summary["fold"].isin(folds)]) if summary is not None else f"{column} per fold"
    ax.set_title(title)
    ax.legend(fontsize=8, ncol=min(len(folds), 5), loc="best")
    return ax


def plot_loss_and_grad(run, title: Optional[str] = None, loss_column: str = "raw_loss"):
    """Two panels: loss per fold and total gradient norm (before clipping) per fold.

    Args:
        run: a :class:`~prot_lib.training.kfold.KFoldResult` (the title then states the folds' fates,
            :func:`describe_divergence`) or a per-step history (give ``title``).
        title: the figure's finding (default: from the run's fates, else "loss and gradient norm per fold").
        loss_column: the loss to draw (``raw_loss``: before any sanitisation; ``train_loss``: as logged).
    """
    history, summary = _history_and_summary(run)
    fig, axes = plt.subplots(1, 2, figsize=(13, 4))
    plot_fold_curves(history, loss_column, ax=axes[0], ylabel="training loss, MSE (target units^2, log)",
                     title="loss per step")
    plot_fold_curves(history, "grad_norm_before_clip", ax=axes[1], mark_column="grad_norm_before_clip",
                     ylabel="total gradient L2 norm (log)", title="gradient norm before clipping")
    if title is None:
        title = describe_divergence(summary) if summary is not None else "loss and gradient norm per fold"
    fig.suptitle(title, fontweight="bold")
    fig.tight_layout()
    return fig


def plot_clip_norms(history: pd.DataFrame, clip_value: float, ax=None, title: Optional[str] = None):
    """Total gradient norm before and after clipping per step against the clip value (log y)."""
    if ax is None:
        _, ax = plt.subplots(figsize=(8, 4))
    h = history.sort_values("step")
    ax.plot(h["step"], h["grad_norm_before_clip"], lw=1, label="before clipping", color=fold_colors(3)[0])
    ax.plot(h["step"], h["grad_norm_after_clip"], lw=1, ls="--", label="after clipping", color=fold_colors(3)[1])
    ax.axhline(clip_value, color="black", lw=1, ls=":", label=f"gradient_clip_val = {clip_value:g}")
    ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("total gradient L2 norm (log)")
    ax.set_title(title or "gradient norm before and after clipping")
    ax.legend(fontsize=8)
    return ax


def plot_lr(history: pd.DataFrame, ax=None, title: Optional[str] = None, label: Optional[str] = None):
    """The learning rate the optimizer really used at each step (read from its param group)."""
    if ax is None:
        _, ax = plt.subplots(figsize=(8, 3.5))
    h = history.sort_values("step")
    ax.plot(h["step"], h["lr"], drawstyle="steps-post", label=label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("learning rate used")
    ax.set_yscale("log")
    ax.set_title(title or "learning rate per optimizer step")
    if label:
        ax.legend(fontsize=8)
    return ax


def plot_param_grad_heatmap(param_grad_norms: pd.DataFrame, fold: int, max_params: int = 40, ax=None,
                            title: Optional[str] = None, every: int = 1):
    """Heatmap of log10 per-parameter gradient norm before clipping (rows: parameters, columns: steps),
    from ``KFoldResult.param_grad_norms`` (column ``grad_norm_before_clip``).

    Non-finite norms are drawn in red on top, so the first bad parameter stands out.
    """
    d = param_grad_norms[(param_grad_norms["fold"] == fold) & (param_grad_norms["param"] != "total")]
    table = d.pivot_table(index="param", columns="step", values="grad_norm_before_clip", aggfunc="first",
                          dropna=False)
    order = [n for n in d["param"].drop_duplicates()][:max_params]
    table = table.loc[[n for n in order if n in table.index]]
    if every > 1:
        table = table.iloc[:, ::every]
    vals = table.to_numpy(dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        logv = np.log10(np.where(np.isfinite(vals) & (vals > 0), vals, np.nan))
    if ax is None:
        _, ax = plt.subplots(figsize=(12, max(4, 0.22 * len(table))))
    sns.heatmap(pd.DataFrame(logv, index=table.index, columns=table.columns), ax=ax, cmap="viridis",
                cbar_kws={"label": "log10 gradient L2 norm"})
    bad = ~np.isfinite(vals)
    if bad.any():
        rows, cols = np.nonzero(bad)
        ax.scatter(cols + 0.5, rows + 0.5, marker="s", s=12, color=NAN_COLOR, label="non-finite")
        ax.legend(loc="upper left", fontsize=8)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("parameter")
    ax.set_title(title or f"per-parameter gradient norms, fold {fold}")
    return ax


def plot_outcome_heatmap(table: pd.DataFrame, value: str, ax=None, title: Optional[str] = None,
                         fmt: str = ".2f", cmap: str = "rocket_r", cbar_label: Optional[str] = None):
    """seaborn heatmap of a (rows x columns) table, e.g. fix x dataset -> val RMSE or NaN rate."""
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 0.5 * len(table) + 1.5))
    sns.heatmap(table, annot=True, fmt=fmt, cmap=cmap, ax=ax, cbar_kws={"label": cbar_label or value},
                linewidths=0.5, linecolor="white")
    ax.set_title(title or value)
    return ax


def plot_activation_scales(scales: dict, ax=None, label: Optional[str] = None, title: Optional[str] = None):
    """max |activation| per layer (log y), from ``S6Regressor.activation_scales``."""
    if ax is None:
        _, ax = plt.subplots(figsize=(7, 3.5))
    names = list(scales)
    vals = [scales[n] if math.isfinite(scales[n]) else np.nan for n in names]
    ax.plot(range(len(names)), vals, marker="o", label=label)
    ax.set_xticks(range(len(names)), names, rotation=30)
    ax.set_yscale("log")
    ax.set_ylabel("max |activation| (log)")
    ax.set_title(title or "activation scale per layer")
    if label:
        ax.legend(fontsize=8)
    return ax


def finding_table(records: Sequence[dict]) -> pd.DataFrame:
    """Per-fold summaries (``KFoldResult.to_records()``) as a compact DataFrame for display."""
    return pd.DataFrame.from_records(records).set_index("fold")


def plot_clip_map(summary: pd.DataFrame, title: Optional[str] = None, max_ratio: float = 2.0):
    """Two heatmaps per dataset (rows: lr, columns: clip setting) of a
    :func:`~prot_lib.experiments.stability.summarize_clip_map` table: the share of folds that stayed
    finite, and the mean val RMSE relative to the best setting of the row (colour saturates at
    ``max_ratio``; "x": the setting lost a fold, "-": every setting of the row lost a fold).

    Returns:
        the Figure.
    """
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
