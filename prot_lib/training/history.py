"""A Lightning callback that keeps a tidy per-step history of a fold.

One row per optimizer step (Lightning's ``global_step`` before the step, counted from 0 within a fold):
``fold, epoch, step, lr, raw_loss, train_loss, grad_norm_before_clip, grad_norm_after_clip,
clip_threshold, loss_finite, grad_finite, params_finite, action``.

- ``lr``: the learning rate of the optimizer's first param group used by the step (after a rollback's
  cut, before the scheduler steps).
- ``raw_loss``: the loss before any sanitisation (with ``training.sanitize: writeup`` the predictions
  are NOT replaced or clamped in it: a NaN prediction shows as a NaN raw loss);
  ``train_loss``: the loss that was back-propagated and logged (the sanitised one).
- ``grad_norm_before_clip``, ``grad_norm_after_clip``: total gradient L2 norms from
  :class:`prot_lib.callbacks.GradNormMonitor`, summed in float64 (a float32 overflow of the squares
  does not read as inf); after: the gradients the update used (0 when the step was dropped).
- ``clip_threshold``: the bound clipping used that step (``gradient_clip_val``, or AutoClip's/ZClip's
  adaptive one; NaN when nothing bounded it, or the step was dropped).
- ``loss_finite``: ``raw_loss`` finite; ``grad_finite``: ``grad_norm_before_clip`` finite, i.e. every
  gradient element finite; ``params_finite``: every parameter finite after the step (the step left
  the model usable).
- ``action``: what ``training.on_nonfinite`` made of the step: "step" (applied; always under the
  default "continue"), "skip" (update dropped) or "rollback" (last good state restored, lr cut,
  update dropped).

With ``training.log_param_grad_norms``: :attr:`HistoryRecorder.param_grad_norms`, one row per
(step, parameter) ``fold, step, param, grad_norm_before_clip, grad_norm_after_clip``, plus a row
``param == "total"``.

Per epoch: ``fold, epoch, step, val_loss, val_rmse``.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional

from ..callbacks import AdaptiveGradientClipping, GradNormMonitor, NonFiniteGuard
from ..compat import Callback
from ..diagnostics.snapshot import params_all_finite

__all__ = ["HistoryRecorder", "params_all_finite"]


class HistoryRecorder(Callback):
    """Collects :attr:`steps`, :attr:`epochs` and (optionally) :attr:`param_grad_norms` as lists of dicts.

    Args:
        fold: the fold index written in every row.
        monitor: the run's :class:`GradNormMonitor` (the gradient norms); must run before this callback.
        guard: the :class:`NonFiniteGuard`, if any (``action``); must run before this callback.
        clipper: the :class:`AdaptiveGradientClipping`, if any (``clip_threshold``).
    """

    def __init__(self, fold: int, monitor: Optional[GradNormMonitor] = None, guard: Optional[NonFiniteGuard] = None,
                 clipper: Optional[AdaptiveGradientClipping] = None):
        self.fold = fold
        self.monitor, self.guard, self.clipper = monitor, guard, clipper
        self.steps: List[Dict] = []
        self.epochs: List[Dict] = []
        self.param_grad_norms: List[Dict] = []
        self._step_before = 0
        self._lr = math.nan

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._step_before = trainer.global_step

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self._lr = float(optimizer.param_groups[0]["lr"])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self._step_before:  # no optimizer step happened
            return
        rec = dict(getattr(pl_module, "last_step_record", {}) or {})
        norms = self.monitor.last if self.monitor is not None else {}
        before = norms.get("grad_norm_before_clip", math.nan)
        action = self.guard.last_action if self.guard is not None else "step"
        if action != "step":
            threshold = math.nan
        elif self.clipper is not None:
            threshold = self.clipper.last_threshold
        else:
            threshold = float(trainer.gradient_clip_val) if trainer.gradient_clip_val else math.nan
        self.steps.append({
            "fold": self.fold,
            "epoch": trainer.current_epoch,
            "step": self._step_before,
            "lr": self._lr,
            "raw_loss": rec.get("raw_loss", math.nan),
            "train_loss": rec.get("train_loss", math.nan),
            "grad_norm_before_clip": before,
            "grad_norm_after_clip": norms.get("grad_norm_after_clip", math.nan),
            "clip_threshold": threshold,
            "loss_finite": math.isfinite(rec.get("raw_loss", math.nan)),
            "grad_finite": math.isfinite(before),
            "params_finite": params_all_finite(pl_module),
            "action": action,
        })
        if self.monitor is not None and "before" in norms:
            after = norms["after"]
            for name, value in norms["before"].items():
                self.param_grad_norms.append({"fold": self.fold, "step": self._step_before, "param": name,
                                              "grad_norm_before_clip": value,
                                              "grad_norm_after_clip": after.get(name, math.nan)})
            self.param_grad_norms.append({"fold": self.fold, "step": self._step_before, "param": "total",
                                          "grad_norm_before_clip": before,
                                          "grad_norm_after_clip": norms.get("grad_norm_after_clip", math.nan)})

    def on_validation_end(self, trainer, pl_module):
        if trainer.sanity_checking:
            return
        m = pl_module.last_val_metrics
        self.epochs.append({
            "fold": self.fold,
            "epoch": trainer.current_epoch,
            "step": trainer.global_step,
            "val_loss": m.get("val_loss", math.nan),
            "val_rmse": m.get("val_rmse", math.nan),
        })
