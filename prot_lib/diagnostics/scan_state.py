r"""The scan's memory: how many tokens a Mamba state adds up, and what sequence length does to a block.

The S6 recurrence (Gu & Dao 2023, eq. 2a, zero-order hold; :mod:`prot_lib.models.selective_scan`),
per channel d and state n:

    h_t = A_bar_t * h_{t-1} + delta_t * B_t * u_t,        A_bar_t = exp(delta_t * A_n)

With A_n < 0 and delta_t > 0, A_bar lies in (0, 1): the state is a leaky sum of its inputs. For a
constant A_bar the weight of the token k steps back is A_bar^k, so after L tokens the state holds

    sum_{k=0}^{L-1} A_bar^k = (1 - A_bar^L) / (1 - A_bar)   terms      (:func:`accumulated_terms`)

which grows like L while L << 1 / (1 - A_bar) and saturates at the *effective memory*

    1 / (1 - A_bar) = 1 / (1 - exp(delta * A)) ~ 1 / (delta * |A|) + 1/2   (:func:`effective_memory`)

mamba-ssm's initialisation (``mamba_simple.Mamba``, mirrored by :class:`prot_lib.models.Mamba`) draws
the step size delta = softplus(dt_proj.bias) log-uniformly in [dt_min, dt_max] = [1e-3, 0.1] and sets
A = -(1, 2, ..., d_state) (S4D-real): for the slowest state (A = -1) A_bar lies in [0.905, 0.999] and
the memory in [10.5, 1000] tokens. A sequence of 3 tokens (Ishigami) uses 3 of them, a chain of 1023
tokens (the write-up's) up to all of them: a block's output grows with L at a fixed input scale, so the
input scale at which a block amplifies (the fixed point s* of :func:`~prot_lib.diagnostics.scale.block_scale_map`)
and at which a plain stack overflows move down as L grows. This module measures that.

Functions (pure: they build nothing they do not return and change no module they are given):

- :func:`effective_memory`, :func:`accumulated_terms`: the closed forms above, elementwise.
- :func:`init_step_sizes`: delta at initialisation of a block, softplus(dt_proj.bias), (d_inner,).
- :func:`scan_memory_table`: a fresh block's A, dt and memory, one row per state n.
- :func:`state_growth_by_length`: one block, one input scale, several L: the delta the block really
  uses, its memory, the state h_L and the output scale.
- :func:`fixed_point_by_length`: s* of :func:`~prot_lib.diagnostics.scale.block_scale_map` for each L.
- :func:`stack_overflow_by_length`: :func:`~prot_lib.diagnostics.scale.growth_by_input_scale` of the
  write-up's plain stack for each L; :func:`overflow_scale_by_length` reads the smallest input scale
  that overflows at each L.
- :func:`stack_summary`: one row from a :func:`~prot_lib.diagnostics.scale.layer_stats` table (the
  last layer of each stack, the first overflowing layer), to compare model switches fold by fold.
"""
from __future__ import annotations

import math
from typing import Iterable, Optional, Sequence, Tuple, Union

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..models.selective_scan import selective_scan
from .scale import GROWTH_VARIANTS, block_scale_map, fixed_point, gaussian_input, growth_by_input_scale, overflow_layer
from .trace import capture_scan

__all__ = [
    "SCAN_MEMORY_COLUMNS",
    "STATE_GROWTH_COLUMNS",
    "effective_memory",
    "accumulated_terms",
    "init_step_sizes",
    "scan_memory_table",
    "state_growth_by_length",
    "fixed_point_by_length",
    "stack_overflow_by_length",
    "overflow_scale_by_length",
    "stack_summary",
]

#: columns of :func:`scan_memory_table`
SCAN_MEMORY_COLUMNS = ["n", "A", "dt_min", "dt_max", "A_bar_min", "A_bar_max", "memory_min", "memory_median",
                       "memory_max"]
#: columns of :func:`state_growth_by_length`
STATE_GROWTH_COLUMNS = ["L", "scale", "delta_median", "memory_median", "terms_median", "state_max", "state_rms",
                        "out_rms", "out_max", "finite"]

Number = Union[float, torch.Tensor]


def _as_tensor(x: Number) -> torch.Tensor:
    return x.double() if isinstance(x, torch.Tensor) else torch.tensor(float(x), dtype=torch.float64)


def effective_memory(delta: Number, A: Number) -> torch.Tensor:
    """1 / (1 - exp(delta * A)): how many tokens a state adds up in the long run, elementwise.

    The sum of the geometric weights A_bar^k, k = 0, 1, ..., of the S6 recurrence with a constant
    A_bar = exp(delta * A) (Gu & Dao 2023, eq. 4, zero-order hold). Computed as -1 / expm1(delta * A),
    exact for small |delta * A| (where 1 - exp(.) would cancel), in float64.

    Args:
        delta: step size(s) after bias and softplus, > 0 (dimensionless); float or tensor.
        A: state coefficient(s), < 0 (``-exp(A_log)``); float or tensor broadcastable with ``delta``.

    Returns:
        float64 tensor of the broadcast shape, in tokens; inf where delta * A == 0.

    Raises:
        ValueError: some delta * A > 0 (a growing state, not a decaying one) or is NaN.
    """
    dA = _as_tensor(delta) * _as_tensor(A)
    if bool((dA > 0).any()) or bool(torch.isnan(dA).any()):
        raise ValueError("effective_memory needs delta * A <= 0 (delta > 0, A < 0); got a positive or NaN product")
    with torch.no_grad():
        return torch.where(dA == 0, torch.full_like(dA, math.inf), -1.0 / torch.expm1(dA))


def accumulated_terms(delta: Number, A: Number, L: int) -> torch.Tensor:
    """(1 - A_bar^L) / (1 - A_bar), A_bar = exp(delta * A): the summed weight of L tokens in h_L.

    The state after L tokens of a constant input c is delta * c times this (h_0 = 0): it grows like
    L while L << :func:`effective_memory` and saturates at it. Computed as
    expm1(L * delta * A) / expm1(delta * A), float64; exactly L where delta * A == 0.

    Args:
        delta, A: as :func:`effective_memory`.
        L: sequence length (tokens), >= 1.

    Returns:
        float64 tensor of the broadcast shape, in tokens (between 1 and L).

    Raises:
        ValueError: L < 1, or delta * A > 0 or NaN.
    """
    if int(L) < 1:
        raise ValueError(f"L must be >= 1, got {L}")
    dA = _as_tensor(delta) * _as_tensor(A)
    if bool((dA > 0).any()) or bool(torch.isnan(dA).any()):
        raise ValueError("accumulated_terms needs delta * A <= 0 (delta > 0, A < 0); got a positive or NaN product")
    safe = torch.where(dA == 0, torch.full_like(dA, -1.0), dA)
    return torch.where(dA == 0, torch.full_like(dA, float(L)), torch.expm1(int(L) * safe) / torch.expm1(safe))


def init_step_sizes(block: nn.Module) -> torch.Tensor:
    """The step size a Mamba block starts from: softplus(dt_proj.bias), (d_inner,) float32.

    mamba-ssm (``mamba_simple.Mamba.__init__``) draws dt log-uniformly in [dt_min, dt_max] (clamped
    below at dt_init_floor) and stores its inverse softplus in ``dt_proj.bias``; the block's delta is
    softplus(dt_proj(x_proj(x)) + bias), so this is delta for an input whose projection is 0.

    Raises:
        AttributeError: ``block`` has no ``dt_proj`` (not a Mamba block).
    """
    return F.softplus(block.dt_proj.bias.detach().float())


def scan_memory_table(block: nn.Module) -> pd.DataFrame:
    """A fresh block's scan, read off its parameters: one row per state index n (1..d_state).

    Args:
        block: a :class:`prot_lib.models.Mamba` (reads ``A_log`` (d_inner, d_state) and
            ``dt_proj.bias`` (d_inner,); nothing is run).

    Returns:
        DataFrame, :data:`SCAN_MEMORY_COLUMNS`: ``n``; ``A`` (the median over channels of
        -exp(A_log[:, n-1]); -n at initialisation); ``dt_min``, ``dt_max`` of
        :func:`init_step_sizes` over channels; ``A_bar_min``/``_max`` of exp(dt * A) and
        ``memory_min``/``_median``/``_max`` of :func:`effective_memory` over channels (tokens).
    """
    A = -torch.exp(block.A_log.detach().double())  # (d_inner, d_state)
    dt = init_step_sizes(block).double()[:, None]  # (d_inner, 1)
    a_bar = torch.exp(dt * A)
    mem = effective_memory(dt, A)
    rows = []
    for n in range(A.shape[1]):
        rows.append({"n": n + 1, "A": float(A[:, n].median()), "dt_min": float(dt.min()), "dt_max": float(dt.max()),
                     "A_bar_min": float(a_bar[:, n].min()), "A_bar_max": float(a_bar[:, n].max()),
                     "memory_min": float(mem[:, n].min()), "memory_median": float(mem[:, n].median()),
                     "memory_max": float(mem[:, n].max())})
    return pd.DataFrame(rows, columns=SCAN_MEMORY_COLUMNS)


@torch.no_grad()
def state_growth_by_length(block: nn.Module, lengths: Iterable[int], scale: float = 1.0, batch: int = 4,
                           seed: int = 0) -> pd.DataFrame:
    """One block fed ``scale * N(0, 1)`` sequences of several lengths: its delta, memory, state and output.

    For each L the block runs once on a (batch, L, d_model) Gaussian input
    (:func:`~prot_lib.diagnostics.scale.gaussian_input`); :func:`~prot_lib.diagnostics.trace.capture_scan`
    keeps the scan's arguments, and the block's own scan (:func:`prot_lib.models.selective_scan`) is run
    again on them with ``return_last_state`` to read the state after the last token.

    Args:
        block: a :class:`prot_lib.models.Mamba` (not changed; run without gradients).
        lengths: sequence lengths L (tokens), each >= 1.
        scale: RMS of the input (the s of the scale map).
        batch: sequences per length.
        seed: seed of the input draw (one draw per L).

    Returns:
        DataFrame, one row per L, :data:`STATE_GROWTH_COLUMNS`: ``delta_median`` (the step size the
        block really uses, after bias and softplus, median over batch, channels and tokens);
        ``memory_median`` (:func:`effective_memory` of that delta with A = A[:, 0], the slowest state);
        ``terms_median`` (:func:`accumulated_terms` for the same at this L); ``state_max`` and
        ``state_rms`` (max |h_L| and RMS of h_L, (batch, d_inner, d_state)); ``out_rms``, ``out_max``
        of the block's output; ``finite`` (output and state free of inf/NaN; the scales are NaN if not).

    Raises:
        ValueError: some L < 1.
    """
    rows = []
    for L in lengths:
        if int(L) < 1:
            raise ValueError(f"every L must be >= 1, got {L}")
        x = gaussian_input(scale, (batch, int(L), block.d_model), seed)
        cap = capture_scan(block, x)
        _, h = selective_scan(cap["u"], cap["delta"], cap["A"], cap["B"], cap["C"], return_last_state=True)
        out = cap["block_out"]
        finite = bool(torch.isfinite(out).all() and torch.isfinite(h).all())
        delta_med = float(cap["delta"].median())
        a_slow = float(cap["A"][:, 0].median())
        rows.append({"L": int(L), "scale": float(scale), "delta_median": delta_med,
                     "memory_median": float(effective_memory(delta_med, a_slow)),
                     "terms_median": float(accumulated_terms(delta_med, a_slow, int(L))),
                     "state_max": float(h.abs().max()) if finite else math.nan,
                     "state_rms": float(h.double().pow(2).mean().sqrt()) if finite else math.nan,
                     "out_rms": float(out.double().pow(2).mean().sqrt()) if finite else math.nan,
                     "out_max": float(out.abs().max()) if finite else math.nan, "finite": finite})
    return pd.DataFrame(rows, columns=STATE_GROWTH_COLUMNS)


def fixed_point_by_length(block: nn.Module, lengths: Iterable[int], scales: Iterable[float], batch: int = 4,
                          seed: int = 0) -> pd.DataFrame:
    """The block's unstable fixed point s* at each sequence length.

    For each L, :func:`~prot_lib.diagnostics.scale.block_scale_map` on a (batch, L, d_model) input and
    :func:`~prot_lib.diagnostics.scale.fixed_point` of it, in RMS and in max |x| terms.

    Args:
        block: a :class:`prot_lib.models.Mamba` (not changed).
        lengths: sequence lengths L (tokens).
        scales: the input scales of each map (the grid s* is interpolated on).
        batch, seed: of the Gaussian input.

    Returns:
        DataFrame, one row per L: ``L``, ``s_star_rms``, ``s_star_max`` (NaN where the map does not
        cross out = in on the grid), and ``gain_at_1`` (out_rms / in_rms at the grid point closest to
        s = 1: the block's near-linear gain).
    """
    scales = sorted(float(s) for s in scales)
    rows = []
    for L in lengths:
        smap = block_scale_map(block, scales, shape=(batch, int(L), block.d_model), seed=seed)
        near1 = smap.iloc[int(np.argmin(np.abs(np.log(smap["scale"].to_numpy()))))]
        rows.append({"L": int(L), "s_star_rms": fixed_point(smap, "rms"), "s_star_max": fixed_point(smap, "max"),
                     "gain_at_1": float(near1["out_rms"] / near1["in_rms"])})
    return pd.DataFrame(rows)


def stack_overflow_by_length(lengths: Iterable[int], scales: Sequence[float], d_model: int = 100, n_layers: int = 4,
                             batch: int = 4, d_state: int = 16, seed: int = 0,
                             variant: str = "stacks (write-up)") -> pd.DataFrame:
    """A freshly initialised two-stack BiMamba fed ``s * N(0, 1)`` at each L and s: does it overflow?

    :func:`~prot_lib.diagnostics.scale.growth_by_input_scale` of one variant of
    :data:`~prot_lib.diagnostics.scale.GROWTH_VARIANTS` (default the write-up's plain stacks) at each
    length, reduced to one row per (L, s). The same seed builds the same blocks at every L.

    Args:
        lengths: sequence lengths L (tokens).
        scales: input scales s (RMS of the stack's input).
        d_model, n_layers, batch, d_state, seed: of the stacks and the input, as ``growth_by_input_scale``.
        variant: a key of ``GROWTH_VARIANTS``.

    Returns:
        DataFrame, one row per (L, s): ``L``, ``scale``, ``last_max`` (the larger max |h| of the two
        stacks' last layers; NaN once it holds a NaN), ``first_nonfinite_layer`` (the first layer of
        either stack holding inf/NaN, NaN if none) and ``overflow`` (True when some layer is non-finite).

    Raises:
        KeyError: unknown variant.
    """
    kw = {variant: GROWTH_VARIANTS[variant]}
    rows = []
    for L in lengths:
        g = growth_by_input_scale(scales, shape=(batch, int(L), d_model), n_layers=n_layers, variants=kw,
                                  d_state=d_state, seed=seed)
        for s, st in g.groupby("scale"):
            layers = st[st["stack"].isin(["forward", "backward"]) & ~st["name"].str.endswith("norm_f")]
            last = layers[layers["layer"] == layers["layer"].max()]
            bad = [v for v in (overflow_layer(st, "forward"), overflow_layer(st, "backward")) if v is not None]
            rows.append({"L": int(L), "scale": float(s),
                         "last_max": float(last["max_abs"].max()) if last["max_abs"].notna().all() else math.nan,
                         "first_nonfinite_layer": min(bad) if bad else math.nan, "overflow": bool(bad)})
    return pd.DataFrame(rows)


def overflow_scale_by_length(table: pd.DataFrame) -> pd.Series:
    """The smallest input scale that overflows at each L of a :func:`stack_overflow_by_length` table.

    Returns:
        Series indexed by L (named "overflow_scale"); NaN where no scale of the grid overflowed.
    """
    def first(t: pd.DataFrame) -> float:
        over = t[t["overflow"]]
        return float(over["scale"].min()) if len(over) else math.nan

    return table.groupby("L").apply(first, include_groups=False).rename("overflow_scale")


def stack_summary(stats: pd.DataFrame) -> dict:
    """One row from a :func:`~prot_lib.diagnostics.scale.layer_stats` table of a two-stack model.

    Args:
        stats: ``layer_stats`` of an :class:`~prot_lib.models.S6Regressor` or a bare BiMamba.

    Returns:
        dict: ``embedded_max`` (max |x| of the embedding row; NaN for a bare BiMamba), ``last_max``
        (the larger max |h| of each stack's last reported row, after its final norm where there is one;
        NaN once it holds a NaN), ``first_nonfinite_layer`` (first layer of either stack with inf/NaN,
        None if none) and ``finite`` (no inf/NaN in any row).
    """
    emb = stats[stats["name"] == "embedding"]
    lasts = []
    for stack in ("forward", "backward", "residual"):
        s = stats[stats["stack"] == stack]
        if len(s):
            lasts.append(s.iloc[-1]["max_abs"])
    bad = [v for v in (overflow_layer(stats, "forward"), overflow_layer(stats, "backward"),
                       overflow_layer(stats, "residual")) if v is not None]
    return {"embedded_max": float(emb["max_abs"].iloc[0]) if len(emb) else math.nan,
            "last_max": float(max(lasts)) if lasts and not any(math.isnan(v) for v in lasts) else math.nan,
            "first_nonfinite_layer": min(bad) if bad else None,
            "finite": bool((stats["n_nan"] == 0).all() and (stats["n_inf"] == 0).all())}
