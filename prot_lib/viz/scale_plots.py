"""Plots of the write-up's mechanism: one block's scale map, and a stack's growth layer by layer.

They draw the tables of :mod:`prot_lib.diagnostics.scale` (``block_scale_map``, ``fixed_point``,
``growth_by_input_scale``, ``layer_stats``); the caller passes the title that states the finding.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from .plots import PALETTE

#: float32's largest finite value, drawn as the ceiling of every growth plot
FLOAT32_MAX = float(np.finfo(np.float32).max)


def plot_scale_map(scale_map: pd.DataFrame, s_star: float = math.nan, measure: str = "rms", ax=None,
                   title: Optional[str] = None):
    """Output scale against input scale of one block, log-log, with the diagonal out = in.

    Args:
        scale_map: a :func:`prot_lib.diagnostics.scale.block_scale_map` table (one or more ``seed``
            values allowed: one line per seed when the column exists).
        s_star: the fixed point (:func:`~prot_lib.diagnostics.scale.fixed_point`), marked if finite.
        measure: "rms" or "max": which scale to draw (``in_<measure>`` -> ``out_<measure>``).
        ax: axes to draw on (default: a new figure).
        title: the finding.

    Returns:
        The axes.

    Raises:
        ValueError: unknown measure.
    """
    if measure not in ("rms", "max"):
        raise ValueError(f"measure must be 'rms' or 'max', got {measure!r}")
    if ax is None:
        _, ax = plt.subplots(figsize=(6.5, 4.5))
    groups = scale_map.groupby("seed") if "seed" in scale_map else [(None, scale_map)]
    for seed, df in groups:
        ax.plot(df[f"in_{measure}"], df[f"out_{measure}"], marker="o", ms=4,
                label="one Mamba block" if seed is None else f"one Mamba block, seed {seed}")
    lo = float(np.nanmin(scale_map[[f"in_{measure}", f"out_{measure}"]].to_numpy()))
    hi = float(np.nanmax(scale_map[[f"in_{measure}", f"out_{measure}"]].to_numpy()))
    ax.plot([lo, hi], [lo, hi], color="0.4", ls="--", lw=1, label="out = in")
    if math.isfinite(s_star):
        ax.axvline(s_star, color=sns.color_palette(PALETTE)[3], ls=":", lw=1.5,
                   label=f"fixed point s* = {s_star:.3g}")
    ax.set(xscale="log", yscale="log", xlabel=f"input scale ({measure.upper()} of the block's input)",
           ylabel=f"output scale ({measure.upper()})", title=title or "scale map of one block")
    ax.legend(fontsize=8)
    return ax


def plot_layer_growth(growth: pd.DataFrame, variants: Optional[Sequence[str]] = None, stack: str = "forward",
                      title: Optional[str] = None):
    """max |h| after each layer of one stack, one line per input scale, one panel per variant (log y).

    A layer whose output holds NaN is drawn at float32's largest value with a cross (the line stops
    there): where the stack overflowed.

    Args:
        growth: a :func:`prot_lib.diagnostics.scale.growth_by_input_scale` table.
        variants: which variants to draw, in order (default: all, in the table's order).
        stack: "forward" or "backward" (the variants of topology "layers" have one stack, "residual",
            drawn whatever ``stack`` says).
        title: the figure's finding.

    Returns:
        The figure.
    """
    variants = list(dict.fromkeys(growth["variant"])) if variants is None else list(variants)
    fig, axes = plt.subplots(1, len(variants), figsize=(4.2 * len(variants), 4), sharey=True, squeeze=False)
    scales = sorted(growth["scale"].unique())
    colors = sns.color_palette("rocket_r", len(scales))
    for ax, variant in zip(axes[0], variants):
        g = growth[growth["variant"] == variant]
        for color, s in zip(colors, scales):
            d = g[g["scale"] == s]
            inp = d[d["stack"] == "input"]
            rows = d[(d["stack"] == stack) | (d["stack"] == "residual")]
            rows = rows[~rows["name"].str.endswith("norm_f")]
            xs = [-1, *rows["layer"].astype(int)]
            ys = [float(inp["max_abs"].iloc[0]), *rows["max_abs"].astype(float)]
            bad = [i for i, v in enumerate(ys) if not math.isfinite(v) or v > FLOAT32_MAX]
            cut = bad[0] if bad else len(ys)
            ax.plot(xs[:cut], ys[:cut], marker="o", ms=4, color=color, label=f"s = {s:g}")
            if bad:  # the overflow: a dotted step up to float32's ceiling, marked with a cross
                ax.plot(xs[cut - 1:cut + 1], [ys[cut - 1], FLOAT32_MAX], color=color, ls=":")
                ax.plot([xs[cut]], [FLOAT32_MAX], marker="X", ms=9, color=color)
        ax.axhline(FLOAT32_MAX, color="0.3", lw=1, ls="--", label="float32 max" if ax is axes[0][-1] else None)
        n_layers = int(g.loc[~g["name"].str.endswith("norm_f"), "layer"].max()) + 1
        ax.set(yscale="log", title=variant, xlabel="layer (-1: the stack's input)", xticks=range(-1, n_layers))
        ax.set_ylim(top=FLOAT32_MAX * 1e3)
    axes[0][0].set_ylabel("max |h| after the layer (log)")
    axes[0][-1].legend(fontsize=8, title="input scale", loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.suptitle(title or "growth layer by layer", fontweight="bold")
    fig.tight_layout()
    return fig
