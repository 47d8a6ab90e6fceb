"""Adaptive gradient clipping: AutoClip (a percentile of past norms) and ZClip (a z-score against an EMA).

A fixed ``gradient_clip_val`` has to be tuned: the right value depends on the model, the data scale, the
loss and the learning rate, and it drifts during training. Both algorithms here replace the value by a
threshold computed from the run's own history of total gradient norms (the L2 norm of all gradients as
one vector, what ``clip_grad_norm_`` measures). Each keeps that history in a small object with one
method, :meth:`threshold`, called once per optimizer step with the step's pre-clip norm; the caller
(:meth:`prot_lib.training.module.NaNStudyModule.configure_gradient_clipping`) then scales the gradients
with ``torch.nn.utils.clip_grads_with_norm_(params, threshold, norm)``.

Switch: ``training.gradient_clip_algorithm: autoclip | zclip`` (parameters ``training.autoclip_percentile``,
``training.zclip_z_thresh``, ``training.zclip_alpha``, ``training.zclip_warmup_steps``). The fixed
``training.gradient_clip_val`` is ignored by these algorithms: not needing it is their point.

AutoClip (Seetharaman, Wichern, Pardo, Le Roux 2020, "AutoClip: Adaptive Gradient Clipping for Source
Separation Networks", MLSP 2020, arXiv:2007.14469)
    At step t, with G_t = {||g_1||, ..., ||g_t||} every norm observed so far *including the current one*,
    clip at eta_t = p-th percentile of G_t (the paper recommends p = 10). Implemented as the paper and the
    authors' reference code (``pseeth/autoclip``, ``autoclip.py``: ``np.percentile(grad_history, p)``,
    numpy's default linear interpolation): global norm, the whole history.
    Deviations: optional ``history`` window (default None = the paper's full history); non-finite norms
    are not added to the history (see below). Note that the authors' later package (``QuantileClip``)
    defaults to *per-parameter* clipping and a 1000-step window, which is not the paper's algorithm.

ZClip (Kumar, Owen, Roy Chowdhury, Gura 2025, "ZClip: Adaptive Spike Mitigation for LLM Pre-Training",
arXiv:2504.02507)
    Warmup: the first ``warmup_steps`` norms are only collected (no clipping); then mu, sigma^2 = their
    mean and population variance. Each later step, with g_t the norm:

        z_t = (g_t - mu) / (sigma + eps)
        if z_t > z_thresh:  g*_t = mu + xi(z_t) * sigma,  gradients scaled by g*_t / g_t
        else:               g*_t = g_t
        mu      <- alpha mu + (1 - alpha) g*_t                      (the EMA sees the *clipped* norm)
        sigma^2 <- alpha sigma^2 + (1 - alpha) (g*_t - mu)^2        (mu already updated, as the
                                                                     authors' code does)

    with the paper's z-score adjustment xi (its Fig. 3): ``mode="reciprocal"`` (ZClip's own choice,
    xi(z) = z_thresh^2 / z: continuous at the threshold and stricter the larger the spike; alias
    "zscore", the name of the authors' code), ``"max"`` (xi = z_thresh: clip to mu + z_thresh sigma, what
    the authors' code calls "percentile" mode) or ``"mean"`` (xi = 0). Defaults alpha = 0.97,
    z_thresh = 2.5, warmup 25 steps, eps = 1e-6 are the paper's / code's.
    Checked against the authors' code (``bluorion-com/ZClip``, ``zclip.py``) before trusting it; we do NOT
    follow it in three places: (1) its ``max_grad_norm`` defaults to 1.0, so out of the box it is *also* a
    fixed clip at 1.0 (and clips at 1.0 during warmup): here there is no fixed ceiling, the warmup does
    not clip; (2) a NaN/inf norm enters its EMA and poisons mu and sigma for the rest of training
    (z becomes NaN, ``z > z_thresh`` is then always False: clipping silently stops); (3) some
    revisions of its file call a method under a name they do not define (``apply_in_place_clipping`` in
    ``zclip.py`` at commit 134344f), so they fail at the first step after the warmup.

Non-finite norms (both algorithms). A NaN or inf norm is never added to the statistics, so one bad step
cannot disable clipping for the rest of the run. Such a gradient cannot be repaired by scaling: the
threshold returned for it is the current one, and ``clip_grads_with_norm_`` then multiplies the
gradients by max_norm / (inf or NaN) = 0 or NaN, so the step's gradient is non-finite, exactly as with
Lightning's fixed norm clipping. That is left visible on purpose: what to do with such a step is the job
of ``training.on_nonfinite`` (skip, roll back, fail fast), not of the clipper.
"""
from __future__ import annotations

import math
from collections import deque
from typing import Deque, Dict, List, Optional

import numpy as np

ZCLIP_MODES = ("reciprocal", "max", "mean")


class AutoClip:
    """Clip at the ``percentile``-th percentile of all total gradient norms seen so far (incl. this one).

    Args:
        percentile: p in (0, 100]; the paper's recommendation is 10 (90 % of steps are clipped, most only
            slightly). 100 never clips (the threshold is the largest norm so far).
        history: keep only the last ``history`` finite norms (None: the paper's whole history).

    Raises:
        ValueError: ``percentile`` outside (0, 100] or ``history`` < 1.
    """

    def __init__(self, percentile: float = 10.0, history: Optional[int] = None) -> None:
        if not 0.0 < percentile <= 100.0:
            raise ValueError(f"percentile must be in (0, 100], got {percentile}")
        if history is not None and history < 1:
            raise ValueError(f"history must be >= 1 or None, got {history}")
        self.percentile = float(percentile)
        self.history = history
        self.norms: Deque[float] = deque(maxlen=history)
        self.n_skipped = 0

    def threshold(self, norm: float) -> float:
        """Record ``norm`` (the step's total gradient norm, before clipping) and return the clip value.

        Returns:
            the p-th percentile (numpy's linear interpolation) of the recorded finite norms; NaN when the
            first norms are all non-finite (nothing to compute a percentile from).
        """
        norm = float(norm)
        if math.isfinite(norm):
            self.norms.append(norm)
        else:
            self.n_skipped += 1
        if not self.norms:
            return math.nan
        return float(np.percentile(np.fromiter(self.norms, dtype=np.float64), self.percentile))

    def state_dict(self) -> Dict:
        return {"norms": list(self.norms), "n_skipped": self.n_skipped}

    def load_state_dict(self, state: Dict) -> None:
        self.norms = deque(state["norms"], maxlen=self.history)
        self.n_skipped = int(state["n_skipped"])

    def __repr__(self) -> str:
        return f"AutoClip(percentile={self.percentile}, history={self.history}, seen={len(self.norms)})"


class ZClip:
    """Clip norms whose z-score against an EMA of past (clipped) norms exceeds ``z_thresh``.

    Args:
        alpha: EMA decay of mean and variance, in (0, 1) (paper: 0.97).
        z_thresh: z-score above which a norm is a spike (paper: 2.5).
        warmup_steps: finite norms collected before the statistics start; no clipping meanwhile (paper: 25).
        mode: "reciprocal" (ZClip; alias "zscore"), "max" or "mean": the adjustment xi(z) of the module
            docstring.
        eps: added to sigma in the z-score (the authors' code: 1e-6).

    Attributes:
        mean, var: the EMA statistics (None during warmup); n_clipped: steps clipped so far.

    Raises:
        ValueError: an argument outside its range (names it).
    """

    def __init__(self, alpha: float = 0.97, z_thresh: float = 2.5, warmup_steps: int = 25,
                 mode: str = "reciprocal", eps: float = 1e-6) -> None:
        mode = "reciprocal" if mode == "zscore" else mode
        if mode not in ZCLIP_MODES:
            raise ValueError(f"mode must be one of {ZCLIP_MODES} (or 'zscore'), got {mode!r}")
        if not 0.0 < alpha < 1.0:
            raise ValueError(f"alpha must be in (0, 1), got {alpha}")
        if not z_thresh > 0.0:
            raise ValueError(f"z_thresh must be > 0, got {z_thresh}")
        if warmup_steps < 1:
            raise ValueError(f"warmup_steps must be >= 1, got {warmup_steps}")
        self.alpha, self.z_thresh, self.warmup_steps = float(alpha), float(z_thresh), int(warmup_steps)
        self.mode, self.eps = mode, float(eps)
        self.buffer: List[float] = []
        self.mean: Optional[float] = None
        self.var: Optional[float] = None
        self.n_clipped = 0
        self.n_skipped = 0

    @property
    def initialized(self) -> bool:
        return self.mean is not None

    def _xi(self, z: float) -> float:
        if self.mode == "reciprocal":
            return self.z_thresh ** 2 / z
        return self.z_thresh if self.mode == "max" else 0.0

    def threshold(self, norm: float) -> float:
        """Decide the step's clip value from ``norm`` (total gradient norm before clipping), then update
        the statistics.

        Returns:
            NaN during warmup (no clipping); mu + xi(z) sigma when the norm is a spike (below ``norm``:
            clipping acts); otherwise the spike boundary mu + z_thresh sigma (above ``norm``: nothing is
            scaled), so the value is always an upper bound of the post-clip norm.
        """
        norm = float(norm)
        if not math.isfinite(norm):
            self.n_skipped += 1
            return self.boundary()
        if not self.initialized:
            self.buffer.append(norm)
            if len(self.buffer) >= self.warmup_steps:
                buf = np.asarray(self.buffer, dtype=np.float64)
                self.mean, self.var = float(buf.mean()), float(buf.var())  # population variance
                self.buffer = []
            return math.nan
        sigma = math.sqrt(self.var)
        z = (norm - self.mean) / (sigma + self.eps)
        if z > self.z_thresh:
            clip_to = self.mean + self._xi(z) * sigma
            effective = clip_to
            self.n_clipped += 1
        else:
            clip_to = self.mean + self.z_thresh * sigma
            effective = norm
        self.mean = self.alpha * self.mean + (1.0 - self.alpha) * effective
        self.var = self.alpha * self.var + (1.0 - self.alpha) * (effective - self.mean) ** 2
        return float(clip_to)

    def boundary(self) -> float:
        """mu + z_thresh sigma with the current statistics (NaN during warmup)."""
        if not self.initialized:
            return math.nan
        return self.mean + self.z_thresh * math.sqrt(self.var)

    def state_dict(self) -> Dict:
        return {"buffer": list(self.buffer), "mean": self.mean, "var": self.var,
                "n_clipped": self.n_clipped, "n_skipped": self.n_skipped}

    def load_state_dict(self, state: Dict) -> None:
        self.buffer = list(state["buffer"])
        self.mean, self.var = state["mean"], state["var"]
        self.n_clipped, self.n_skipped = int(state["n_clipped"]), int(state["n_skipped"])

    def __repr__(self) -> str:
        return (f"ZClip(alpha={self.alpha}, z_thresh={self.z_thresh}, warmup_steps={self.warmup_steps}, "
                f"mode={self.mode!r}, mean={self.mean}, var={self.var})")


def make_clipper(training_config) -> Optional[object]:
    """The adaptive clipper a :class:`~prot_lib.training.config.TrainingConfig` asks for, else None.

    Reads ``gradient_clip_algorithm`` ("autoclip" | "zclip"), ``autoclip_percentile``, ``zclip_alpha``,
    ``zclip_z_thresh``, ``zclip_warmup_steps``.
    """
    algo = training_config.gradient_clip_algorithm
    if algo == "autoclip":
        return AutoClip(percentile=training_config.autoclip_percentile)
    if algo == "zclip":
        return ZClip(alpha=training_config.zclip_alpha, z_thresh=training_config.zclip_z_thresh,
                     warmup_steps=training_config.zclip_warmup_steps)
    return None
