r"""Why a stack of plain Mamba blocks explodes: the scale map of one block, and growth layer by layer.

The write-up's BiMamba stacks Mamba blocks with nothing between them (no residual, no norm). Whether
such a stack is stable is a question about one block's *scale map*: feed an input of scale s, read
the scale of the output. For a Mamba block (``prot_lib.models.Mamba``; mamba-ssm's math)

    x, z = in_proj(u)                     ~ s
    x    = silu(conv1d(x))                ~ s          (silu is linear for large inputs)
    delta = softplus(dt_proj(x_proj(x)))  ~ s          (softplus too)
    B, C  = x_proj(x)                     ~ s
    y     = C . scan(delta B x) * silu(z)  ~ s^4 - s^5  (plus D x silu(z) ~ s^2)

so for small s the block is close to linear (output ~ c * s, c < 1 at initialisation) and for large
s its output grows like a power s^k with k up to about 5: the *local exponent*

    k(s) = d log(out scale) / d log(s)

rises with s. Where the curve out(s) crosses the diagonal out = s there is a fixed point s*, and
because k(s*) > 1 it is unstable: a stack started below s* shrinks layer by layer towards 0, one
started above it grows layer by layer, each layer raising the scale to a power k > 1, until a product
inside the scan overflows float32 (3.4e38) and inf - inf or 0 * inf gives NaN. That is the write-up's
debug log: "NaN after forward layer 2" at (batch 50, L 1023, d_model 100), the finite values of that
layer near 3e26 (proT/baseline/MAMBA_NAN_FIX_FINAL.md at scipi1/proT e755f0c^).

A residual stream changes the picture (each layer adds to h instead of replacing it, so the scale
cannot shrink towards 0 and a block's output is compared with h, not with itself), and a norm removes
it: after a LayerNorm every token has unit RMS whatever came in, so the next block always sees s ~ 1.

Functions:

- :func:`gaussian_input`: s * N(0, 1) of a given shape, seeded.
- :func:`block_scale_map`: one block, a grid of s -> a table with the output scale and k(s).
- :func:`fixed_point`: where the map crosses out = s (log-log interpolation).
- :func:`layer_stats`: one forward of a regressor or a bare BiMamba, per layer of each stack:
  max |h|, RMS, NaN/inf counts, min/max/mean over finite values (what the write-up printed).
- :func:`growth_by_input_scale`: :func:`layer_stats` of freshly initialised stacks (several
  variants: the write-up's, with post-norm, pre-norm residual, Vim-style layers) for several s.
- :func:`writeup_debug_lines`: :func:`layer_stats` rendered as the write-up's ``[BiMamba DEBUG]``
  lines, to set their log beside ours.

"Scale" is measured two ways everywhere: RMS over all elements (for a Gaussian input: s itself) and
max |.| (what their log shows). They differ by the tails: the block's exponent is applied per token,
so the largest tokens grow fastest and max |h| runs ahead of the RMS.
"""
from __future__ import annotations

import math
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import pandas as pd
import torch
import torch.nn as nn

from ..models import BiMamba, BiMambaStacks, Mamba, S6Regressor

__all__ = [
    "GROWTH_VARIANTS",
    "SCALE_MAP_COLUMNS",
    "LAYER_STATS_COLUMNS",
    "gaussian_input",
    "block_scale_map",
    "fixed_point",
    "layer_stats",
    "overflow_layer",
    "growth_by_input_scale",
    "writeup_debug_lines",
]

#: columns of :func:`block_scale_map`
SCALE_MAP_COLUMNS = ["scale", "in_rms", "in_max", "out_rms", "out_max", "k_rms", "k_max", "finite"]
#: columns of :func:`layer_stats`
LAYER_STATS_COLUMNS = ["stack", "layer", "name", "max_abs", "rms", "n_nan", "n_inf", "finite_min",
                       "finite_max", "finite_mean"]

#: the variants :func:`growth_by_input_scale` compares, as arguments of the BiMamba they build
GROWTH_VARIANTS: Dict[str, dict] = {
    "stacks (write-up)": dict(topology="stacks"),
    "stacks + postnorm (their fix)": dict(topology="stacks", norm="layernorm", norm_position="post"),
    "stacks + prenorm residual (mamba-ssm)": dict(topology="stacks", norm="layernorm", norm_position="pre",
                                                  residual=True),
    "stacks + residual, no norm": dict(topology="stacks", residual=True),
    "layers (Vim-style residual)": dict(topology="layers"),
}


def gaussian_input(scale: float, shape: Tuple[int, int, int], seed: int = 0) -> torch.Tensor:
    """``scale * N(0, 1)`` of ``shape`` = (batch, L, d_model), float32, from its own generator.

    The same seed gives the same direction for every scale, so a scale map is a clean curve.
    """
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(shape, generator=g)


def _local_exponent(s: np.ndarray, out: np.ndarray) -> np.ndarray:
    """d log out / d log s on the grid (central differences; one-sided at the ends; NaN where out is
    not finite and positive)."""
    ls = np.log(s)
    with np.errstate(divide="ignore", invalid="ignore"):
        lo = np.where(np.isfinite(out) & (out > 0), np.log(np.where(out > 0, out, 1.0)), np.nan)
    if len(s) < 2:
        return np.full(len(s), np.nan)
    return np.gradient(lo, ls)


@torch.no_grad()
def block_scale_map(block: nn.Module, scales: Iterable[float], shape: Tuple[int, int, int] = (8, 256, 16),
                    seed: int = 0) -> pd.DataFrame:
    """The scale map of one block: input ``s * N(0, 1)`` -> output scale, for each s of ``scales``.

    Args:
        block: a module mapping (batch, L, d_model) -> (batch, L, d_model), e.g. one
            :class:`~prot_lib.models.Mamba` (run in its current mode, without gradients).
        scales: input scales s (> 0), any order; sorted in the result.
        shape: (batch, L, d_model) of the input; d_model must be the block's.
        seed: seed of the Gaussian input (the same draw for every s).

    Returns:
        DataFrame, one row per s, :data:`SCALE_MAP_COLUMNS`: the input's RMS and max |x|, the output's
        RMS and max |y|, the local exponents ``k_rms`` = d log out_rms / d log s and ``k_max`` (of
        out_max), and ``finite`` (False once the output holds inf/NaN; its scales are then NaN).

    Raises:
        ValueError: a scale <= 0, or fewer than one scale.
    """
    s = sorted(float(v) for v in scales)
    if not s or s[0] <= 0:
        raise ValueError(f"scales must be > 0 and not empty, got {s}")
    z = gaussian_input(1.0, shape, seed)
    rows = []
    for v in s:
        x = v * z
        y = block(x).float()
        finite = bool(torch.isfinite(y).all())
        rows.append({"scale": v, "in_rms": float(x.pow(2).mean().sqrt()), "in_max": float(x.abs().max()),
                     "out_rms": float(y.double().pow(2).mean().sqrt()) if finite else math.nan,
                     "out_max": float(y.abs().max()) if finite else math.nan, "finite": finite})
    df = pd.DataFrame(rows)
    df["k_rms"] = _local_exponent(df["in_rms"].to_numpy(), df["out_rms"].to_numpy())
    df["k_max"] = _local_exponent(df["in_max"].to_numpy(), df["out_max"].to_numpy())
    return df[SCALE_MAP_COLUMNS]


def fixed_point(scale_map: pd.DataFrame, measure: str = "rms") -> float:
    """The input scale s* where the map crosses out = in (from below to above), log-log interpolated.

    Args:
        scale_map: a :func:`block_scale_map` table.
        measure: "rms" (out_rms against in_rms) or "max" (out_max against in_max).

    Returns:
        s* in units of the chosen measure, or NaN when the map never crosses upward on its grid (all
        points below: no unstable fixed point in range; all above: the block amplifies everywhere).

    Raises:
        ValueError: unknown measure.
    """
    if measure not in ("rms", "max"):
        raise ValueError(f"measure must be 'rms' or 'max', got {measure!r}")
    m = scale_map[scale_map["finite"]].sort_values("scale")
    x = np.log(m[f"in_{measure}"].to_numpy())
    gap = np.log(m[f"out_{measure}"].to_numpy()) - x  # < 0: the block shrinks its input
    for i in range(len(gap) - 1):
        if gap[i] < 0 <= gap[i + 1]:
            t = -gap[i] / (gap[i + 1] - gap[i])
            return float(math.exp(x[i] + t * (x[i + 1] - x[i])))
    return math.nan


def _stats(name: str, stack: str, layer: int, h: torch.Tensor) -> dict:
    h = h.detach().float()
    finite = torch.isfinite(h)
    vals = h[finite]
    n_nan, n_inf = int(torch.isnan(h).sum()), int(torch.isinf(h).sum())
    return {
        "stack": stack, "layer": layer, "name": name,
        "max_abs": float(h.abs().max()) if n_nan == 0 else math.nan,
        "rms": float(h.double().pow(2).mean().sqrt()) if n_nan == 0 and n_inf == 0 else math.nan,
        "n_nan": n_nan, "n_inf": n_inf,
        "finite_min": float(vals.min()) if vals.numel() else math.nan,
        "finite_max": float(vals.max()) if vals.numel() else math.nan,
        "finite_mean": float(vals.double().mean()) if vals.numel() else math.nan,
    }


@torch.no_grad()
def layer_stats(model: nn.Module, x: torch.Tensor) -> pd.DataFrame:
    """One forward, with the statistics of the activation after every layer of each stack.

    Args:
        model: an :class:`~prot_lib.models.S6Regressor` (x = raw tokens (batch, L, n_features); the
            embedding is the first row) or a bare :class:`~prot_lib.models.BiMambaStacks` /
            :class:`~prot_lib.models.BiMamba` (x = embedded tokens (batch, L, d_model)). Run in its
            current mode: call ``eval()`` first to switch dropout off.
        x: the input, float32.

    Returns:
        DataFrame, :data:`LAYER_STATS_COLUMNS`, rows in forward order: "embedding" (regressor only,
        stack "input"), then for "stacks" ``forward_layers.i`` (stack "forward", layer i) for every i,
        then ``backward_layers.i``, each after its norm/residual/dropout (where the write-up printed),
        plus ``*_norm_f`` with pre-norm; for "layers" ``layers.i`` (stack "residual") and ``norm_f``.
        ``max_abs``/``rms`` are NaN once the tensor holds a NaN (``max_abs`` is inf with inf but no
        NaN); ``finite_*`` are over the finite elements, as the write-up's "Stats" line.

    Raises:
        TypeError: a model of another kind.
    """
    rows: List[dict] = []
    if isinstance(model, S6Regressor):
        h = model.embedding(x)
        rows.append(_stats("embedding", "input", -1, h))
        bimamba = model.bimamba
    elif isinstance(model, (BiMambaStacks, BiMamba)):
        h, bimamba = x, model
    else:
        raise TypeError(f"layer_stats needs an S6Regressor, BiMambaStacks or BiMamba, got {type(model).__name__}")
    if isinstance(bimamba, BiMambaStacks):
        for direction in ("forward", "backward"):
            blocks, _, norm_f = bimamba.stack(direction)
            g = h if direction == "forward" else h.flip(1)
            for i in range(len(blocks)):
                g = bimamba.block_step(direction, i, g)
                rows.append(_stats(f"{direction}_layers.{i}", direction, i, g))
            if not isinstance(norm_f, nn.Identity):
                rows.append(_stats(f"{direction}_norm_f", direction, len(blocks), norm_f(g)))
    else:
        for i, layer in enumerate(bimamba.layers):
            h = layer(h)
            rows.append(_stats(f"layers.{i}", "residual", i, h))
        if not isinstance(bimamba.norm_f, nn.Identity):
            rows.append(_stats("norm_f", "residual", len(bimamba.layers), bimamba.norm_f(h)))
    return pd.DataFrame(rows, columns=LAYER_STATS_COLUMNS)


def overflow_layer(stats: pd.DataFrame, stack: str = "forward") -> Optional[int]:
    """The first layer of ``stack`` whose output holds a NaN or inf (None if it stays finite)."""
    s = stats[(stats["stack"] == stack) & (stats["layer"] >= 0)]
    bad = s[(s["n_nan"] > 0) | (s["n_inf"] > 0)]
    return None if bad.empty else int(bad["layer"].iloc[0])


def _bimamba(variant: Mapping, d_model: int, n_layers: int, d_state: int, backend: str) -> nn.Module:
    kw = dict(variant)
    topology = kw.pop("topology", "stacks")
    if topology == "stacks":
        return BiMambaStacks(d_model, n_layers, d_state=d_state, backend=backend, **kw)
    return BiMamba(d_model, n_layers, d_state=d_state, backend=backend, **kw)


@torch.no_grad()
def growth_by_input_scale(scales: Sequence[float], shape: Tuple[int, int, int] = (8, 256, 16),
                          n_layers: int = 4, variants: Optional[Mapping[str, Mapping]] = None,
                          d_state: int = 16, seed: int = 0, input_seed: int = 1,
                          backend: str = "torch") -> pd.DataFrame:
    """Layer-by-layer scale of freshly initialised stacks fed ``s * N(0, 1)``, for each s and variant.

    Args:
        scales: input scales s (the RMS of the stack's input).
        shape: (batch, L, d_model) of the input (the write-up's: (50, 1023, 100)).
        n_layers: blocks per stack (per residual stream for "layers").
        variants: {label: BiMamba arguments}, default :data:`GROWTH_VARIANTS`; "topology" picks
            :class:`~prot_lib.models.BiMambaStacks` ("stacks", default) or :class:`~prot_lib.models.BiMamba`.
        d_state, backend: passed to every block.
        seed: ``torch.manual_seed`` before building each variant (same seed: same first blocks).
        input_seed: seed of the Gaussian input (the same draw for every s and variant).

    Returns:
        :func:`layer_stats` rows with two more columns, ``variant`` and ``scale``, plus a row per
        (variant, scale) for the input itself (stack "input", layer -1, name "input").
    """
    variants = GROWTH_VARIANTS if variants is None else variants
    z = gaussian_input(1.0, shape, input_seed)
    frames = []
    for label, kw in variants.items():
        torch.manual_seed(seed)
        model = _bimamba(kw, shape[-1], n_layers, d_state, backend).eval()
        for s in scales:
            x = float(s) * z
            st = pd.concat([pd.DataFrame([_stats("input", "input", -1, x)]), layer_stats(model, x)],
                           ignore_index=True)
            st.insert(0, "scale", float(s))
            st.insert(0, "variant", label)
            frames.append(st)
    return pd.concat(frames, ignore_index=True)


def writeup_debug_lines(stats: pd.DataFrame, shape: Optional[Tuple[int, ...]] = None) -> List[str]:
    """:func:`layer_stats` of a "stacks" model as the write-up's per-layer debug lines.

    Their BiMamba printed, after every layer of each stack (after the norm, before the dropout), either
    ``[BiMamba DEBUG] Forward layer i OK - min=..., max=..., mean=...`` or, when the tensor held a NaN,
    ``[BiMamba DEBUG] NaN after forward layer i! Shape: ...`` followed (forward stack only) by the
    min/max of its finite elements (proT/baseline/s6/s6_wrapper.py at scipi1/proT e755f0c^). This
    renders our numbers in that shape so the two logs can be read side by side; the wording is theirs
    (a log format is a fact), the numbers are ours.

    Args:
        stats: :func:`layer_stats` of a "stacks" model.
        shape: the tensor shape to print (e.g. (50, 1023, 100)); omitted when None.

    Returns:
        One string per printed line.
    """
    lines = []
    shp = f" Shape: torch.Size({list(shape)})" if shape is not None else ""
    for _, r in stats[stats["stack"].isin(["forward", "backward"]) & ~stats["name"].str.endswith("norm_f")].iterrows():
        d, i = r["stack"], int(r["layer"])
        if r["n_nan"] > 0:
            lines.append(f"[BiMamba DEBUG] NaN after {d} layer {i}!{shp}")
            if d == "forward":
                lines.append(f"[BiMamba DEBUG] Stats: min={r['finite_min']:.6e}, max={r['finite_max']:.6e}")
        else:
            lines.append(f"[BiMamba DEBUG] {d.capitalize()} layer {i} OK - min={r['finite_min']:.4f}, "
                         f"max={r['finite_max']:.4f}, mean={r['finite_mean']:.4f}")
    return lines
