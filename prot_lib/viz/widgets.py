"""The clip-value explorer: move ``gradient_clip_val``, retrain one short fold, see loss and gradient norms.

:func:`clip_explorer` returns an ipywidgets box with a log-scale clip slider (``FloatLogSlider``), an
"off" checkbox, a learning-rate slider and a dataset dropdown. Every change (debounced: sliders send
their value on release, ``continuous_update=False``) retrains one fold with
:func:`prot_lib.experiments.quick.quick_train` (``Trainer(gradient_clip_val=...)``, the way Lightning really
clips) and redraws, as a PNG ``<img>`` inside an ``ipywidgets.Output``:

- left: the raw training loss per optimizer step (log y), the first non-finite step marked;
- right: the total gradient L2 norm before and after clipping, with the clip value as a line.

The PNG lives in the Output widget's state, so a static page built from the executed notebook (MyST-NB
embeds widget state) shows the last plot without a kernel; only moving the slider needs one. For the
static book, :func:`prot_lib.experiments.stability.clip_sweep` (re-exported here; it runs through the sweep
engine) precomputes a sweep over clip values and :func:`plot_clip_sweep` draws it. What a run did (its
title, its status line) is read from its fate (:mod:`prot_lib.training.fate`).

Tests drive the widget without a kernel: its controls are attributes (``clip_slider``, ``off_toggle``,
``lr_slider``, ``dataset``, ``output``, ``status``), :meth:`ClipExplorer.update` retrains synchronously,
``last_result`` is the last :class:`~prot_lib.training.kfold.KFoldResult` and ``last_png`` the last image.
"""
from __future__ import annotations

import base64
import io
import math
import time
from typing import Optional, Sequence

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

#: the datasets the explorer offers: the write-up's two reports (the long stand-in takes minutes per step)
EXPLORER_DATASETS = ("ishigami", "dyconex")
#: the models the explorer offers: label -> ``model.topology``
EXPLORER_MODELS = {"write-up stacks": "stacks", "residual stack": "layers"}

__all__ = ["ClipExplorer", "clip_explorer", "clip_sweep", "plot_clip_run", "plot_clip_sweep", "figure_png",
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


class ClipExplorer(widgets.VBox):
    """The widget :func:`clip_explorer` returns (an ``ipywidgets.VBox``).

    Attributes:
        clip_slider: ``FloatLogSlider``, ``gradient_clip_val`` (max total gradient L2 norm).
        off_toggle: ``Checkbox``; checked = clipping off (the slider is then disabled).
        lr_slider: ``FloatLogSlider``, AdamW learning rate per optimizer step.
        dataset: ``Dropdown``, "ishigami" or "dyconex".
        status: ``HTML``, one line on the last training (or its error).
        output: ``Output`` holding the plot as one PNG display (``<img>`` in a browser).
        last_result: the last :class:`~prot_lib.training.kfold.KFoldResult` (None before the first).
        last_png: the PNG bytes of the last plot.
        n_updates: trainings done so far.
    """

    def __init__(self, dataset: str = "ishigami", lr: Optional[float] = None, clip_values: Sequence[float] = (1e-2, 1e2),
                 clip_value: float = 1.0, clip_on: bool = True, max_steps: int = 120, seed: int = 0,
                 fold: int = 0, lr_range: Sequence[float] = (1e-4, 1e-1), run: bool = True,
                 topology: str = "stacks"):
        lo, hi = float(min(clip_values)), float(max(clip_values))
        if not 0 < lo < hi:
            raise ValueError(f"clip_values must span a positive range, got {clip_values!r}")
        self.max_steps, self.seed, self.fold = int(max_steps), int(seed), int(fold)
        if lr is None:  # the shipped reproduction's learning rate
            lr = quick_config(dataset).training.lr
        self.clip_slider = widgets.FloatLogSlider(
            value=min(max(clip_value, lo), hi), base=10, min=math.log10(lo), max=math.log10(hi), step=0.25,
            description="clip value", readout_format=".3g", continuous_update=False,
            style={"description_width": "initial"}, layout=widgets.Layout(width="420px"))
        self.off_toggle = widgets.Checkbox(value=not clip_on, description="clipping off", indent=False,
                                           layout=widgets.Layout(width="120px"))
        self.lr_slider = widgets.FloatLogSlider(
            value=lr, base=10, min=math.log10(lr_range[0]), max=math.log10(lr_range[1]), step=0.25,
            description="learning rate", readout_format=".2g", continuous_update=False,
            style={"description_width": "initial"}, layout=widgets.Layout(width="420px"))
        if dataset not in EXPLORER_DATASETS or topology not in EXPLORER_MODELS.values():
            raise ValueError(f"dataset must be one of {EXPLORER_DATASETS} and topology one of "
                             f"{tuple(EXPLORER_MODELS.values())}, got {dataset!r}, {topology!r}")
        self.dataset = widgets.Dropdown(options=list(EXPLORER_DATASETS), value=dataset, description="dataset",
                                        layout=widgets.Layout(width="220px"))
        self.model = widgets.Dropdown(options=list(EXPLORER_MODELS.items()), value=topology, description="model",
                                      layout=widgets.Layout(width="240px"))
        self.status = widgets.HTML(value="")
        self.output = widgets.Output(layout=widgets.Layout(min_height="300px"))
        self.last_result = None
        self.last_png: Optional[bytes] = None
        self.n_updates = 0
        self.clip_slider.disabled = self.off_toggle.value
        super().__init__(children=[
            widgets.HBox([self.clip_slider, self.off_toggle]),
            widgets.HBox([self.lr_slider, self.dataset, self.model]),
            self.status, self.output,
        ])
        for control in (self.clip_slider, self.off_toggle, self.lr_slider, self.dataset, self.model):
            control.observe(self._on_change, names="value")
        if run:
            self.update()

    @property
    def gradient_clip_val(self) -> Optional[float]:
        """The clip value the controls ask for (None when off)."""
        return None if self.off_toggle.value else float(self.clip_slider.value)

    def _on_change(self, change) -> None:
        self.clip_slider.disabled = self.off_toggle.value
        try:
            self.update()
        except Exception as err:  # shown in the widget instead of lost in the kernel log
            self.status.value = f"<b style='color:#d62728'>training failed:</b> {type(err).__name__}: {err}"

    def update(self):
        """Retrain one fold with the controls' values and redraw (synchronously). Returns the result."""
        clip = self.gradient_clip_val
        self.status.value = "<i>training…</i>"
        t0 = time.perf_counter()
        res = quick_train(self.dataset.value, float(self.lr_slider.value), clip, max_steps=self.max_steps,
                          seed=self.seed, fold=self.fold, overrides=topology_overrides(self.model.value))
        seconds = time.perf_counter() - t0
        fig = Figure(figsize=(12, 4))
        axes = fig.subplots(1, 2)
        h = res.history
        finding = describe_clip_run(res, clip)
        plot_clip_run(res, clip, axes=axes, title=(f"{self.dataset.value} ({self.model.label}), fold {self.fold}, "
                                                   f"lr {self.lr_slider.value:.2g}: {finding}"))
        png = figure_png(fig)
        self.last_result, self.last_png = res, png
        self.n_updates += 1
        self.output.outputs = ({
            "output_type": "display_data",
            "data": {"image/png": base64.b64encode(png).decode("ascii"),
                     "text/plain": f"<loss and gradient norm, {finding}>"},
            "metadata": {},
        },)
        self.status.value = (f"{finding} &nbsp;·&nbsp; {len(h)} optimizer steps "
                             f"trained in {seconds:.1f} s")
        return res


def clip_explorer(dataset: str = "ishigami", lr: Optional[float] = None, clip_values: Sequence[float] = (1e-2, 1e2),
                  max_steps: int = 120, seed: int = 0, fold: int = 0, clip_value: float = 1.0,
                  clip_on: bool = True, run: bool = True, topology: str = "stacks") -> ClipExplorer:
    """The clip-value explorer widget (see the module docstring); trains once at creation when ``run``.

    Args:
        dataset: "ishigami" or "dyconex" (the shipped reproduction config of that dataset).
        lr: initial AdamW learning rate (slider from 1e-4 to 1e-1, log scale); None: the shipped
            reproduction config's (``reproduction_config(dataset).training.lr``).
        clip_values: (smallest, largest) ``gradient_clip_val`` of the log slider.
        max_steps: optimizer steps per training (Ishigami: ~25 per epoch).
        seed, fold: which fold of which seed's k-fold split to train.
        clip_value, clip_on: the initial slider value and whether clipping starts on.
        run: train and draw once now (False: wait for :meth:`ClipExplorer.update`).
        topology: the model the explorer starts with: "stacks" (the write-up's BiMamba) or "layers"
            (the Vim-style residual stack); a dropdown switches it.

    Raises:
        ValueError: a dataset outside :data:`EXPLORER_DATASETS` or an unknown topology.
    """
    return ClipExplorer(dataset=dataset, lr=lr, clip_values=clip_values, clip_value=clip_value,
                        clip_on=clip_on, max_steps=max_steps, seed=seed, fold=fold, run=run, topology=topology)
