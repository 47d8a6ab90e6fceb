"""The clip-value explorer: move ``gradient_clip_val``, retrain one short fold, see loss and gradient norms.

:func:`clip_explorer` returns an ipywidgets box with a log-spaced clip slider (``SelectionSlider`` at
1-2-5 positions per decade), a "clip | off" toggle, a learning-rate slider and dataset and model
dropdowns. With a kernel every change (debounced: sliders send their value on release,
``continuous_update=False``) retrains one fold with :func:`prot_lib.experiments.quick.quick_train`
(``Trainer(gradient_clip_val=...)``, the way Lightning really clips) and redraws, as a PNG ``<img>``
inside an ``ipywidgets.Output``:

- left: the raw training loss per optimizer step (log y), the first non-finite step marked;
- right: the total gradient L2 norm before and after clipping, with the clip value as a line.

Without a kernel (the static book) nothing can retrain: :func:`explorer_grid` precomputes the same
short runs over a small grid at build time and ``clip_explorer(..., grid=...)`` carries them; moving a
control in the page shows the figure and outcome of the nearest grid point, under the note "precomputed
grid; run the notebook for any value" (how, and why that mechanism: :mod:`prot_lib.viz.static_explorer`).
For a sweep table, :func:`prot_lib.experiments.stability.clip_sweep` (re-exported here; it runs through
the sweep engine) and :func:`plot_clip_sweep` draw it. What a run did (its title, its status line) is
read from its fate (:mod:`prot_lib.training.fate`).

Tests drive the widget without a kernel: its controls are attributes (``clip_slider``, ``off_toggle``,
``lr_slider``, ``dataset``, ``model``, ``output``, ``status``), :meth:`ClipExplorer.update` retrains
synchronously, ``last_result`` is the last :class:`~prot_lib.training.kfold.KFoldResult` and
``last_png`` the last image.
"""
from __future__ import annotations

import base64
import io
import math
import time
from typing import Mapping, Optional, Sequence, Tuple, Union

import ipywidgets as widgets
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from ..experiments.cells import fold_rows
from ..experiments.quick import quick_config, quick_train
from ..experiments.stability import clip_sweep
from ..training.config import topology_overrides
from ..training.kfold import KFoldResult
from . import plots
from .static_explorer import (ExplorerGrid, GridPoint, compact_png, grid_key, log_positions, nearest_log,
                              precomputed_view)

#: the datasets the explorer offers: the write-up's two reports (the long stand-in takes minutes per step)
EXPLORER_DATASETS = ("ishigami", "dyconex")
#: the models the explorer offers: label -> ``model.topology``
EXPLORER_MODELS = {"write-up stacks": "stacks", "residual stack": "layers"}

__all__ = ["ClipExplorer", "clip_explorer", "explorer_grid", "render_clip_run", "ExplorerGrid", "clip_sweep",
           "plot_clip_run", "plot_clip_sweep", "figure_png",
           "describe_clip_run", "describe_sweep", "plot_adam_probe", "adam_probe_ratios"]


def figure_png(fig) -> bytes:
    """The figure as PNG bytes (100 dpi, tight)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return buf.getvalue()


def describe_clip_run(run: KFoldResult, gradient_clip_val: Optional[float], fold: Optional[int] = None) -> str:
    """One line on what a fold did, read from its fate, e.g. "clip 1: non-finite at step 39; 100% of
    steps clipped".

    Args:
        run: the fold's :class:`~prot_lib.training.kfold.KFoldResult`.
        gradient_clip_val: the run's clip value (None: off).
        fold: which fold (default: the run's first).
    """
    row = fold_rows(run, [fold if fold is not None else int(run.summary["fold"].iloc[0])])[0]
    head = f"clip {gradient_clip_val:g}" if gradient_clip_val else "clipping off"
    fate = (f"non-finite at step {row['first_nonfinite_step']}" if row["nonfinite"]
            else f"finite for {row['n_steps']} steps, final loss {row['final_loss']:.3g}")
    if gradient_clip_val:
        clipped = row["clipped_fraction"] if math.isfinite(row["clipped_fraction"]) else 0.0
        fate += f"; {clipped:.0%} of steps clipped"
    return f"{head}: {fate}"


def plot_clip_run(run, gradient_clip_val: Optional[float], axes=None, title: Optional[str] = None):
    """Loss and gradient norm (before/after clipping) of one fold, first non-finite value marked.

    Args:
        run: a one-fold :class:`~prot_lib.training.kfold.KFoldResult`, or the per-step history of a
            single fold (then give ``title``).
        gradient_clip_val: the clip value of the run (None: off; no line drawn).
        axes: two Axes to draw into (default: a new pyplot figure, 12 x 4 in).
        title: suptitle (default :func:`describe_clip_run` for a run, "loss and gradient norm" for a history).

    Returns:
        the Figure.
    """
    history = run if isinstance(run, pd.DataFrame) else run.history
    if title is None:
        title = "loss and gradient norm" if isinstance(run, pd.DataFrame) else describe_clip_run(run, gradient_clip_val)
    if axes is None:
        fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    fig = axes[0].figure
    h = history.sort_values("step")
    plots.plot_fold_curves(h, "raw_loss", ax=axes[0], ylabel="training loss, MSE (target units², log)",
                           title="loss per optimizer step")
    ax = axes[1]
    colors = plots.fold_colors(3)
    step = h["step"].to_numpy()
    any_finite = False
    for col, label, color, ls in (("grad_norm_before_clip", "before clipping", colors[0], "-"),
                                  ("grad_norm_after_clip", "after clipping", colors[1], "--")):
        y = h[col].to_numpy(dtype=float)
        ok = np.isfinite(y) & (y > 0)
        ax.plot(step[ok], y[ok], lw=1.1, ls=ls, color=color, label=label)
        any_finite |= bool(ok.any())
    if gradient_clip_val:
        ax.axhline(gradient_clip_val, color="black", lw=1, ls=":", label=f"gradient_clip_val = {gradient_clip_val:g}")
    s = plots.first_nonfinite_step(h, "grad_norm_before_clip")
    if s is not None:
        ax.axvline(s, color=plots.NAN_COLOR, ls="--", lw=1)
        ax.annotate(f"non-finite norm\nat step {s}", (s, 0.6), xycoords=("data", "axes fraction"),
                    xytext=(4, 0), textcoords="offset points", fontsize=8, color=plots.NAN_COLOR)
    ax.set_yscale("log")
    if not any_finite:  # a log axis without data has no valid limits
        ax.set_ylim(0.1, 10.0)
        ax.text(0.5, 0.5, "no finite gradient norm", transform=ax.transAxes, ha="center", color=plots.NAN_COLOR)
    ax.set_xlabel("optimizer step (within fold)")
    ax.set_ylabel("total gradient L2 norm (log)")
    ax.set_title("gradient norm before and after clipping")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="best")
    if len(step):  # keep every step on the x axis, even when nothing finite was drawn
        for a in axes:
            a.set_xlim(step.min() - 1, step.max() + 1)
    fig.suptitle(title, fontweight="bold")
    fig.tight_layout()
    return fig


def _sweep_order(df: pd.DataFrame) -> list:
    """Clip settings by value, "none" (no value) last."""
    order = df.drop_duplicates("setting").assign(v=lambda d: d["gradient_clip_val"].fillna(math.inf))
    return list(order.sort_values("v", kind="stable")["setting"])


def describe_sweep(df: pd.DataFrame) -> str:
    """E.g. "non-finite runs per gradient_clip_val: norm 0.1: 0/5, norm 1: 1/5, none: 0/5"."""
    parts = []
    for setting in _sweep_order(df):
        g = df[df["setting"] == setting]
        parts.append(f"{setting}: {int(g['nonfinite'].sum())}/{len(g)}")
    return "non-finite runs per gradient_clip_val: " + ", ".join(parts)


def plot_clip_sweep(df: pd.DataFrame, title: Optional[str] = None):
    """A :func:`clip_sweep` table (the engine's rows) as a figure: per clip setting (x, "none" last), the
    largest finite loss of each run (log y; a run that went non-finite, by its fate, is a red cross) and
    the share of non-finite runs.

    Returns:
        the Figure.
    """
    order = _sweep_order(df)
    pos = {c: i for i, c in enumerate(order)}
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4), gridspec_kw={"width_ratios": [2, 1]})
    rng = np.random.default_rng(0)
    for bad, marker, color, label in ((False, "o", plots.fold_colors(1)[0], "stayed finite"),
                                      (True, "X", plots.NAN_COLOR, "went non-finite")):
        g = df[df["nonfinite"] == bad]
        if g.empty:
            continue
        x = np.array([pos[c] for c in g["setting"]], dtype=float) + rng.uniform(-0.12, 0.12, len(g))
        y = g["max_loss"].to_numpy(dtype=float)
        y = np.where(np.isfinite(y), y, np.nan)
        ax.scatter(x, y, marker=marker, s=60 if bad else 35, color=color, edgecolor="black", lw=0.5,
                   label=label, zorder=3)
    ax.set_xticks(range(len(order)), order)
    ax.set_yscale("log")
    ax.set_xlabel("clip setting (Trainer(gradient_clip_val=...))")
    ax.set_ylabel("largest finite training loss of the run (log)")
    ax.set_title("how far each run's loss spiked")
    ax.legend(fontsize=8)
    rate = df.groupby("setting")["nonfinite"].mean().reindex(order)
    ax2.bar(range(len(order)), rate.to_numpy(), color=[plots.NAN_COLOR if r > 0 else "grey" for r in rate])
    ax2.set_xticks(range(len(order)), order)
    ax2.set_ylim(0, 1)
    ax2.set_xlabel("clip setting")
    ax2.set_ylabel("fraction of runs non-finite")
    ax2.set_title(f"share of runs non-finite ({len(df) // max(len(order), 1)} per setting)")
    fig.suptitle(title or describe_sweep(df), fontweight="bold")
    fig.tight_layout()
    return fig


def adam_probe_ratios(off: pd.DataFrame, on: pd.DataFrame) -> dict:
    """Medians over the finite steps of two :func:`~prot_lib.experiments.quick.adam_probe` frames (clipping
    off, on): how much smaller the gradient Adam receives and its sqrt(v) are with clipping
    (``grad``, ``sqrt_v``: off / on) and how the step size changes (``update``: on / off)."""
    def med(df, col):
        v = df[col].to_numpy(dtype=float)
        return float(np.median(v[np.isfinite(v)]))
    return {"grad": med(off, "grad_norm_after_clip") / med(on, "grad_norm_after_clip"),
            "sqrt_v": med(off, "sqrt_v_norm") / med(on, "sqrt_v_norm"),
            "update": med(on, "update_norm") / med(off, "update_norm")}


def plot_adam_probe(off: pd.DataFrame, on: pd.DataFrame, gradient_clip_val: float, title: Optional[str] = None):
    """Three panels per step, clipping off vs on: the gradient norm Adam receives (after clipping), the
    norm of Adam's sqrt(v), and the L2 norm of the weight update (all log y).

    Returns:
        the Figure.
    """
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    colors = plots.fold_colors(2)
    panels = (("grad_norm_after_clip", "gradient norm given to Adam"), ("sqrt_v_norm", "‖√v‖, Adam's divisor"),
              ("update_norm", "‖Δθ‖, the step taken"))
    for ax, (col, name) in zip(axes, panels):
        for df, label, color in ((off, "clipping off", colors[0]),
                                 (on, f"gradient_clip_val = {gradient_clip_val:g}", colors[1])):
            y = df[col].to_numpy(dtype=float)
            ok = np.isfinite(y) & (y > 0)
            ax.plot(df["step"].to_numpy()[ok], y[ok], lw=1.1, color=color, label=label)
        ax.set_yscale("log")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(name + " (log)")
        ax.set_title(name)
    axes[0].legend(fontsize=8)
    r = adam_probe_ratios(off, on)
    fig.suptitle(title or (f"clipping makes the gradient {r['grad']:.0f}x and √v {r['sqrt_v']:.0f}x smaller; "
                           f"Adam's step changes by a factor {r['update']:.2f}"), fontweight="bold")
    fig.tight_layout()
    return fig


def render_clip_run(res: KFoldResult, dataset: str, topology: str, lr: float, gradient_clip_val: Optional[float],
                    fold: int) -> Tuple[bytes, str]:
    """The explorer's figure of one run (:func:`plot_clip_run`, 12 x 4 in at 100 dpi, stored with a
    64-colour palette by :func:`~prot_lib.viz.static_explorer.compact_png`) and its one-line outcome
    (:func:`describe_clip_run`): (PNG bytes, outcome text). The live explorer and the precomputed grid
    (:func:`explorer_grid`) draw with this one function, so both show the same figure."""
    finding = describe_clip_run(res, gradient_clip_val)
    label = {v: k for k, v in EXPLORER_MODELS.items()}.get(topology, topology)
    fig = Figure(figsize=(12, 4))
    plot_clip_run(res, gradient_clip_val, axes=fig.subplots(1, 2),
                  title=f"{dataset} ({label}), fold {fold}, lr {lr:.2g}: {finding}")
    return compact_png(figure_png(fig)), finding


def explorer_grid(datasets: Sequence[str] = ("ishigami",),
                  lrs: Union[None, Sequence[float], Mapping[str, Sequence[float]]] = None,
                  clip_values: Union[Sequence[Optional[float]], Mapping[str, Sequence[Optional[float]]]] = (
                      None, 0.1, 1.0, 10.0),
                  topology: str = "stacks", max_steps: int = 120, seed: int = 0, fold: int = 0) -> ExplorerGrid:
    """Precompute the explorer's outcomes for the static page (:mod:`prot_lib.viz.static_explorer`):
    one :func:`quick_train` run per (dataset, lr, clip value), the same short run the live explorer
    trains for those control values, drawn by :func:`render_clip_run`. Runs go through
    :func:`~prot_lib.training.kfold.run_kfold`, so with ``PROT_LIB_CACHE`` set a run a chapter (or the
    explorer) already trained is read back, never trained twice.

    Args:
        datasets: datasets of :data:`EXPLORER_DATASETS`.
        lrs: AdamW learning rates, the same for every dataset or {dataset: lrs}; None: each dataset's
            shipped reproduction lr.
        clip_values: ``gradient_clip_val`` values, the same for every dataset or {dataset: values};
            None (or 0) is clipping off.
        topology, max_steps, seed, fold: as :func:`clip_explorer`.

    Returns:
        an :class:`~prot_lib.viz.static_explorer.ExplorerGrid`, per dataset its lrs x clip values.

    Raises:
        ValueError: a dataset outside :data:`EXPLORER_DATASETS`, an unknown topology, or a non-positive lr.
    """
    if any(d not in EXPLORER_DATASETS for d in datasets) or topology not in EXPLORER_MODELS.values():
        raise ValueError(f"datasets must be in {EXPLORER_DATASETS} and topology one of "
                         f"{tuple(EXPLORER_MODELS.values())}, got {list(datasets)!r}, {topology!r}")
    points = {}
    for ds in datasets:
        ds_lrs = lrs.get(ds) if isinstance(lrs, Mapping) else lrs
        for lr in (ds_lrs if ds_lrs is not None else [quick_config(ds).training.lr]):
            if not lr > 0:
                raise ValueError(f"explorer_grid: lr must be positive, got {lr!r} for {ds!r}")
            for clip in (clip_values[ds] if isinstance(clip_values, Mapping) else clip_values):
                # the key's values (12 significant digits) are the ones the explorer's sliders hold:
                # 0.02 * 2.5 trains as 0.05, the same run (and cache entry) as the slider's 0.05
                key = grid_key(ds, lr, clip)
                res = quick_train(ds, key[1], key[2], max_steps=max_steps, seed=seed, fold=fold,
                                  overrides=topology_overrides(topology))
                png, finding = render_clip_run(res, ds, topology, key[1], key[2], fold)
                points[key] = GridPoint(png=png, outcome=finding)
    return ExplorerGrid(topology=topology, max_steps=int(max_steps), seed=int(seed), fold=int(fold), points=points)


class ClipExplorer(widgets.VBox):
    """The widget :func:`clip_explorer` returns (an ``ipywidgets.VBox``).

    Every control is a selection widget (an integer ``index`` in the browser), so that a static page can
    switch among precomputed figures with ``jsdlink`` alone (:mod:`prot_lib.viz.static_explorer`).

    Attributes:
        clip_slider: ``SelectionSlider`` of ``gradient_clip_val`` (max total gradient L2 norm), at
            1-2-5 log positions (:func:`~prot_lib.viz.static_explorer.log_positions`).
        off_toggle: ``ToggleButtons`` "clip" | "off" with values False | True; True = clipping off
            (the slider is then disabled).
        lr_slider: ``SelectionSlider`` of the AdamW learning rate per optimizer step, 1-2-5 log positions.
        dataset: ``Dropdown``, "ishigami" or "dyconex".
        model: ``Dropdown`` of :data:`EXPLORER_MODELS` (value: ``model.topology``).
        status: ``HTML``, one line on the last training (or its error).
        output: ``Output`` holding the plot as one PNG display (``<img>`` in a browser).
        live: the ``VBox`` of ``status`` and ``output``; hidden while the precomputed view is shown.
        grid: the :class:`~prot_lib.viz.static_explorer.ExplorerGrid` shown without a kernel, or None.
        precomputed: the view of ``grid`` (note + nested Stacks), or None without a grid.
        last_result: the last :class:`~prot_lib.training.kfold.KFoldResult` (None before the first).
        last_png: the PNG bytes of the last plot.
        n_updates: trainings done so far.
    """

    def __init__(self, dataset: str = "ishigami", lr: Optional[float] = None, clip_values: Sequence[float] = (1e-2, 1e2),
                 clip_value: float = 1.0, clip_on: bool = True, max_steps: int = 120, seed: int = 0,
                 fold: int = 0, lr_range: Sequence[float] = (1e-4, 1e-1), run: bool = True,
                 topology: str = "stacks", grid: Optional[ExplorerGrid] = None):
        lo, hi = float(min(clip_values)), float(max(clip_values))
        if not 0 < lo < hi:
            raise ValueError(f"clip_values must span a positive range, got {clip_values!r}")
        if dataset not in EXPLORER_DATASETS or topology not in EXPLORER_MODELS.values():
            raise ValueError(f"dataset must be one of {EXPLORER_DATASETS} and topology one of "
                             f"{tuple(EXPLORER_MODELS.values())}, got {dataset!r}, {topology!r}")
        self.max_steps, self.seed, self.fold = int(max_steps), int(seed), int(fold)
        if grid is not None and (grid.max_steps, grid.seed, grid.fold) != (self.max_steps, self.seed, self.fold):
            raise ValueError(f"the grid's runs ({grid!r}) are not the explorer's (max_steps={self.max_steps}, "
                             f"seed={self.seed}, fold={self.fold})")
        if lr is None:  # the shipped reproduction's learning rate
            lr = quick_config(dataset).training.lr
        clip_value = min(max(float(clip_value), lo), hi)
        clip_pos = log_positions(lo, hi, extra=[clip_value])
        lr_pos = log_positions(float(lr_range[0]), float(lr_range[1]), extra=[lr])
        slider = dict(continuous_update=False, style={"description_width": "initial"},
                      layout=widgets.Layout(width="420px"))
        self.clip_slider = widgets.SelectionSlider(
            options=[(f"{v:g}", v) for v in clip_pos], value=nearest_log(clip_value, clip_pos),
            description="clip value", **slider)
        self.off_toggle = widgets.ToggleButtons(options=[("clip", False), ("off", True)], value=not clip_on,
                                                description="clipping",
                                                style={"button_width": "44px", "description_width": "initial"},
                                                layout=widgets.Layout(width="230px"))
        self.lr_slider = widgets.SelectionSlider(
            options=[(f"{v:.2g}", v) for v in lr_pos], value=nearest_log(lr, lr_pos),
            description="learning rate", **slider)
        self.dataset = widgets.Dropdown(options=[(d, d) for d in EXPLORER_DATASETS], value=dataset,
                                        description="dataset", layout=widgets.Layout(width="220px"))
        self.model = widgets.Dropdown(options=list(EXPLORER_MODELS.items()), value=topology, description="model",
                                      layout=widgets.Layout(width="240px"))
        self.status = widgets.HTML(value="")
        self.output = widgets.Output(layout=widgets.Layout(min_height="300px"))
        self.live = widgets.VBox([self.status, self.output])
        self.grid, self.precomputed, self._links = grid, None, []
        if grid is not None:
            self.precomputed, self._links = precomputed_view(
                grid, model=self.model, dataset=self.dataset, lr_slider=self.lr_slider,
                off_toggle=self.off_toggle, clip_slider=self.clip_slider)
            self.live.layout.display = "none"  # shown on the first change with a kernel
        self.last_result = None
        self.last_png: Optional[bytes] = None
        self.n_updates = 0
        self.clip_slider.disabled = self.off_toggle.value
        super().__init__(children=[
            widgets.HBox([self.clip_slider, self.off_toggle]),
            widgets.HBox([self.lr_slider, self.dataset, self.model]),
            *([self.precomputed] if self.precomputed is not None else []), self.live,
        ])
        for control in (self.clip_slider, self.off_toggle, self.lr_slider, self.dataset, self.model):
            control.observe(self._on_change, names="value")
        if run:
            self.update()

    def __repr__(self) -> str:
        # the text/plain a notebook stores next to the widget view: one line, never the children tree
        grid = f", {len(self.grid)} precomputed runs" if self.grid is not None else ""
        return (f"<clip-value explorer: {self.dataset.value}, {self.model.label}, lr {self.lr_slider.value:.2g}, "
                f"{'clipping off' if self.off_toggle.value else f'clip {self.clip_slider.value:g}'}{grid}>")

    @property
    def gradient_clip_val(self) -> Optional[float]:
        """The clip value the controls ask for (None when off)."""
        return None if self.off_toggle.value else float(self.clip_slider.value)

    @property
    def showing_precomputed(self) -> bool:
        """True while the precomputed grid, not a live training, is what the widget shows."""
        return self.precomputed is not None and self.precomputed.layout.display != "none"

    def _on_change(self, change) -> None:
        # Only a kernel runs this: the static page switches the precomputed view by itself (jsdlink).
        self.clip_slider.disabled = self.off_toggle.value
        if self.precomputed is not None:  # from now on the live plot is what the controls ask for
            self.precomputed.layout.display = "none"
            self.live.layout.display = None
        try:
            self.update()
        except Exception as err:  # shown in the widget instead of lost in the kernel log
            self.status.value = f"<b style='color:#d62728'>training failed:</b> {type(err).__name__}: {err}"

    def update(self):
        """Retrain one fold with the controls' values and redraw (synchronously). Returns the result.

        While the precomputed view is shown (a grid, no change yet) the plot is not put into
        ``output``: the grid holds the same figure, and the page stores it once."""
        clip, lr = self.gradient_clip_val, float(self.lr_slider.value)
        self.status.value = "<i>training…</i>"
        t0 = time.perf_counter()
        res = quick_train(self.dataset.value, lr, clip, max_steps=self.max_steps,
                          seed=self.seed, fold=self.fold, overrides=topology_overrides(self.model.value))
        seconds = time.perf_counter() - t0
        png, finding = render_clip_run(res, self.dataset.value, self.model.value, lr, clip, self.fold)
        self.last_result, self.last_png = res, png
        self.n_updates += 1
        if not self.showing_precomputed:
            self.output.outputs = ({
                "output_type": "display_data",
                "data": {"image/png": base64.b64encode(png).decode("ascii"),
                         "text/plain": f"<loss and gradient norm, {finding}>"},
                "metadata": {},
            },)
        self.status.value = (f"{finding} &nbsp;·&nbsp; {len(res.history)} optimizer steps "
                             f"trained in {seconds:.1f} s")
        return res


def clip_explorer(dataset: str = "ishigami", lr: Optional[float] = None, clip_values: Sequence[float] = (1e-2, 1e2),
                  max_steps: int = 120, seed: int = 0, fold: int = 0, clip_value: float = 1.0,
                  clip_on: bool = True, run: bool = True, topology: str = "stacks",
                  grid: Optional[ExplorerGrid] = None) -> ClipExplorer:
    """The clip-value explorer widget (see the module docstring); trains once at creation when ``run``.

    Args:
        dataset: "ishigami" or "dyconex" (the shipped reproduction config of that dataset).
        lr: initial AdamW learning rate (slider from 1e-4 to 1e-1 at 1-2-5 log positions, plus this
            value); None: the shipped reproduction config's (``reproduction_config(dataset).training.lr``).
        clip_values: (smallest, largest) ``gradient_clip_val`` of the log slider.
        max_steps: optimizer steps per training (Ishigami: ~25 per epoch).
        seed, fold: which fold of which seed's k-fold split to train.
        clip_value, clip_on: the initial slider value (snapped to the nearest position) and whether
            clipping starts on.
        run: train and draw once now (False: wait for :meth:`ClipExplorer.update`).
        topology: the model the explorer starts with: "stacks" (the write-up's BiMamba) or "layers"
            (the Vim-style residual stack); a dropdown switches it.
        grid: precomputed runs (:func:`explorer_grid`, same ``max_steps``, ``seed``, ``fold``) that a
            page without a kernel shows for the nearest grid point; None: live only.

    Raises:
        ValueError: a dataset outside :data:`EXPLORER_DATASETS`, an unknown topology, or a grid of
            other runs (another max_steps, seed or fold).
    """
    return ClipExplorer(dataset=dataset, lr=lr, clip_values=clip_values, clip_value=clip_value,
                        clip_on=clip_on, max_steps=max_steps, seed=seed, fold=fold, run=run, topology=topology,
                        grid=grid)
