"""Adaptive gradient clipping: AutoClip (a percentile of past norms) and ZClip (a z-score against an EMA).

A fixed ``gradient_clip_val`` has to be tuned: the right value depends on the model, the data scale, the
loss and the learning rate, and it drifts during training. Both algorithms here replace the value by a
threshold computed from the run's own history of total gradient norms (the L2 norm of all gradients as
one vector, what ``clip_grad_norm_`` measures; here without float32 overflow,
:mod:`prot_lib.diagnostics.grads`). Each keeps that history in a small object with one method,
:meth:`threshold`, called once per optimizer step with the step's pre-clip norm.

:class:`AdaptiveGradientClipping` is the Lightning callback for any LightningModule: in
``on_before_optimizer_step`` (after backward, before Lightning's own ``gradient_clip_val`` clipping and
``optimizer.step``) it feeds the pre-clip norm to the algorithm and scales the gradients as
``torch.nn.utils.clip_grads_with_norm_`` does (by ``threshold / (norm + 1e-6)`` when the norm exceeds the
threshold). Its state is saved in and restored from Lightning checkpoints (``state_dict`` /
``load_state_dict``), so a resumed run clips exactly as an uninterrupted one.

Config switch of ``prot_lib``'s own runs: ``training.gradient_clip_algorithm: autoclip | zclip``
(parameters ``training.autoclip_percentile``, ``training.zclip_z_thresh``, ``training.zclip_alpha``,
``training.zclip_warmup_steps``), translated by :func:`prot_lib.training.safety_nets.safety_nets`. The
fixed ``training.gradient_clip_val`` is then not given to the Trainer: not needing it is their point.

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
    Checked against the authors' code (``bluorion-com/ZClip``, ``zclip.py``; PyPI ``zclip`` 1.0.0, whose
    ``mode="zscore", clip_option="adaptive_scaling"`` is our ``"reciprocal"``): with ``max_grad_norm=None``
    it gives the same thresholds on the same run (``tests/test_callbacks.py``:
    ``test_zclip_matches_the_pypi_package``, relative difference below 1e-6). We do NOT follow it in
    three places: (1) its ``max_grad_norm`` defaults to 1.0, so out of the box it is *also* a fixed clip
    at 1.0 (and clips at 1.0 during warmup): here there is no fixed ceiling, the warmup does not clip;
    (2) a NaN/inf norm enters its EMA and poisons mu and sigma for the rest of training (z becomes NaN,
    ``z > z_thresh`` is then always False: clipping silently stops); (3) it measures the norm in the
    parameters' dtype, so above ~1.8e19 a finite float32 gradient has an inf norm (and some revisions
    of its file call a method under a name they do not define: ``apply_in_place_clipping`` in
    ``zclip.py`` at commit 134344f).

Non-finite norms (both algorithms). A NaN or inf norm is never added to the statistics, so one bad step
cannot disable clipping for the rest of the run. Such a gradient cannot be repaired by scaling, and
:class:`AdaptiveGradientClipping` leaves it as it is: what to do with such a step is the job of
:class:`prot_lib.callbacks.NonFiniteGuard` (skip, roll back, fail fast), not of the clipper. (Lightning's
fixed norm clipping instead multiplies it by max_norm / inf = 0, which turns an inf into NaN and zeroes
the finite elements.) A step the guard dropped has no gradients: nothing is fed to the algorithm.
"""
from __future__ import annotations

import math
from collections import deque
from typing import Any, Deque, Dict, List, Optional

import numpy as np
import torch

from ..compat import Callback
from ..diagnostics.grads import forget, pre_clip_grad_norms, track

ZCLIP_MODES = ("reciprocal", "max", "mean")
ALGORITHMS = ("autoclip", "zclip")


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


class AdaptiveGradientClipping(Callback):
    """Clip the total gradient norm at an adaptive threshold: AutoClip or ZClip, as a Lightning callback.

    Works with any LightningModule using automatic optimization, under ``lightning.pytorch`` and
    ``pytorch_lightning``, alone or with ``Trainer(gradient_clip_val=...)`` (Lightning's fixed clipping
    then runs after this one, as a ceiling).

    Args:
        algorithm: ``"autoclip"`` (:class:`AutoClip`) or ``"zclip"`` (:class:`ZClip`).
        percentile, history: AutoClip's arguments (paper: p = 10, whole history).
        alpha, z_thresh, warmup_steps, mode, eps: ZClip's arguments (paper: 0.97, 2.5, 25, "reciprocal", 1e-6).
        log: log ``clip_threshold`` (the bound of each step; NaN when none, e.g. during ZClip's warmup)
            through ``pl_module.log``.

    Attributes:
        clipper: the :class:`AutoClip` / :class:`ZClip` (its statistics).
        last_threshold: the bound used at the latest optimizer step (NaN: none).

    Raises:
        ValueError: unknown ``algorithm`` or an argument out of range (names it).

    Example::

        trainer = Trainer(callbacks=[AdaptiveGradientClipping("zclip")])
    """

    def __init__(self, algorithm: str = "autoclip", percentile: float = 10.0, history: Optional[int] = None,
                 alpha: float = 0.97, z_thresh: float = 2.5, warmup_steps: int = 25, mode: str = "reciprocal",
                 eps: float = 1e-6, log: bool = True) -> None:
        if algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
        self.algorithm = algorithm
        self.clipper = (AutoClip(percentile=percentile, history=history) if algorithm == "autoclip" else
                        ZClip(alpha=alpha, z_thresh=z_thresh, warmup_steps=warmup_steps, mode=mode, eps=eps))
        self._log = log
        self.last_threshold = math.nan

    def on_fit_start(self, trainer, pl_module) -> None:
        track(pl_module)

    def on_after_backward(self, trainer, pl_module) -> None:
        forget(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        forget(pl_module)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        norms = pre_clip_grad_norms(pl_module)
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        if not grads:  # dropped by NonFiniteGuard (or no gradient at all): nothing to learn from, nothing to clip
            threshold = math.nan
        else:
            total = norms.total_value()
            threshold = self.clipper.threshold(total)
            if math.isfinite(total) and math.isfinite(threshold) and total > threshold:
                # torch.nn.utils.clip_grads_with_norm_'s coefficient, computed in float64
                torch._foreach_mul_(grads, threshold / (total + 1e-6))
        self.last_threshold = threshold
        if self._log:
            pl_module.log("clip_threshold", threshold, on_step=True, on_epoch=False)

    def state_dict(self) -> Dict[str, Any]:
        return {"algorithm": self.algorithm, "clipper": self.clipper.state_dict()}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        if state_dict["algorithm"] != self.algorithm:
            raise ValueError(f"checkpoint holds {state_dict['algorithm']} state, this callback is {self.algorithm}")
        self.clipper.load_state_dict(state_dict["clipper"])

    def __repr__(self) -> str:
        return f"AdaptiveGradientClipping({self.clipper!r})"
