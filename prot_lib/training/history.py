"""A Lightning callback that keeps a tidy per-step history of a fold.

One row per optimizer step (Lightning's ``global_step`` before the step, counted from 0 within a fold):
``fold, epoch, step, lr, raw_loss, train_loss, grad_norm_before_clip, grad_norm_after_clip,
clip_threshold, loss_finite, grad_finite, params_finite``. ``clip_threshold`` is the bound clipping used
that step (``gradient_clip_val``, or AutoClip's/ZClip's adaptive one; NaN when nothing bounded it).
``raw_loss`` is the loss before the write-up's loss-element replacement (NaN -> 1e6); with
``training.sanitize: writeup`` its predictions have already been replaced (NaN -> 0) and clamped, so a
NaN prediction does not show in it (chapter 4: the gradients are NaN all the same). ``train_loss`` is
the loss that was back-propagated and logged. ``params_finite`` is checked after the optimizer step, so it says whether the step left the
model usable. ``action`` is what
``training.on_nonfinite`` made of the step: "step" (applied; always, under the default "continue"),
"skip" (update dropped) or "rollback" (last good state restored, lr cut, update dropped).

Per epoch: ``fold, epoch, step, val_loss, val_rmse``.
"""
from __future__ import annotations

import math
from typing import Dict, List

import lightning.pytorch as pl
import torch


def params_all_finite(module: torch.nn.Module) -> bool:
    """True when every parameter of ``module`` is finite (one fused reduction per parameter)."""
    return all(bool(torch.isfinite(p).all()) for p in module.parameters())


class HistoryRecorder(pl.Callback):
    """Collects :attr:`steps`, :attr:`epochs` and (optionally) :attr:`param_grad_norms` as lists of dicts."""

    def __init__(self, fold: int):
        self.fold = fold
        self.steps: List[Dict] = []
        self.epochs: List[Dict] = []
        self.param_grad_norms: List[Dict] = []
        self._step_before = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._step_before = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self._step_before:  # no optimizer step happened (e.g. skipped)
            return
        rec = dict(pl_module.last_step_record)
        before = rec.get("grad_norm_before_clip", math.nan)
        row = {
            "fold": self.fold,
            "epoch": trainer.current_epoch,
            "step": self._step_before,
            "lr": rec.get("lr", math.nan),
            "raw_loss": rec.get("raw_loss", math.nan),
            "train_loss": rec.get("train_loss", math.nan),
            "grad_norm_before_clip": before,
            "grad_norm_after_clip": rec.get("grad_norm_after_clip", math.nan),
            "clip_threshold": rec.get("clip_threshold", math.nan),
            "loss_finite": math.isfinite(rec.get("raw_loss", math.nan)),
            "grad_finite": math.isfinite(before),
            "params_finite": params_all_finite(pl_module),
            "action": rec.get("action", "step"),
        }
        self.steps.append(row)
        if pl_module.param_grad_norms is not None:
            for name, value in pl_module.param_grad_norms.items():
                self.param_grad_norms.append({"fold": self.fold, "step": self._step_before,
                                              "param": name, "grad_norm": value})
            pl_module.param_grad_norms = None

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
