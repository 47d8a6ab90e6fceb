"""The LightningModule: a BiMamba regressor whose every fix from the write-up is a config switch.

The step follows the write-up's ``_step`` (proT ``baseline_pl_modules.py`` as described in
``shared/seeds``) when ``training.sanitize: writeup``; gradient monitoring follows its
``on_before_optimizer_step``; clipping happens where Lightning really applies it
(``Trainer(gradient_clip_val=...)`` -> :meth:`configure_gradient_clipping`), or, behind
``training.clip_via: configure_optimizers``, where the write-up put it: a ``gradient_clip_val`` key in
the dict returned by :meth:`configure_optimizers`, which Lightning 2.x only warns about
("Found unsupported keys in the optimizer configuration") and never applies.

Every optimizer step, the total gradient norm before and after clipping is measured in
:meth:`configure_gradient_clipping` (the hook Lightning calls after ``on_before_optimizer_step``,
right before ``optimizer.step``), so tests and the book can prove whether clipping happened.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict, Optional

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import grad_norm
from torch.optim.lr_scheduler import LinearLR, SequentialLR, StepLR

from ..models import build_model
from .clipping import make_clipper
from .config import RunConfig

#: the write-up's sanitisation constants
SANITIZE_CLAMP = 1e6
SANITIZE_LOSS_FILL = 1e6

_LOSSES = {
    "mse": lambda p, t: F.mse_loss(p, t, reduction="none"),
    "mae": lambda p, t: F.l1_loss(p, t, reduction="none"),
    "huber": lambda p, t: F.huber_loss(p, t, reduction="none", delta=1.0),
}


def total_grad_norm(parameters) -> torch.Tensor:
    """L2 norm of all gradients viewed as one vector (0-dim tensor; inf/NaN propagate).

    Same quantity as ``torch.nn.utils.get_total_norm`` / ``clip_grad_norm_``'s return value.
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.tensor(0.0)
    return torch.nn.utils.get_total_norm(grads, norm_type=2.0)


class NaNStudyModule(pl.LightningModule):
    """S6Regressor + loss + optimizer, with the write-up's fixes as switches.

    Args:
        config: the validated :class:`RunConfig`.
        n_features: F, the width of each token of the input ``x: (batch, L, F)``.

    Batches are ``(x, y)`` with ``x: (batch, L, F) float32`` and ``y: (batch,) float32`` (raw units of
    the target). Logged metrics: ``train_loss``, ``val_loss``, ``val_rmse`` (target units), and with
    sanitisation on the write-up's ``{stage}_nan_detected``, ``{stage}_loss_nan_detected``,
    ``{stage}_final_loss_nan``; with monitoring on ``invalid_gradients_detected`` and
    ``grad_norm_{param_name}`` (only for parameters whose gradient is non-finite).

    After every optimizer step, :attr:`last_step_record` holds the numbers of that step
    (``lr``, ``grad_norm_before_clip``, ``grad_norm_after_clip``, ``raw_loss``, ``train_loss``,
    ``action``: "step", or "skip"/"rollback" when ``training.on_nonfinite`` dropped the step),
    read by :class:`prot_lib.training.history.HistoryRecorder`.
    """

    def __init__(self, config: RunConfig, n_features: int):
        super().__init__()
        self.config = config
        self.save_hyperparameters({"config": config.to_dict(), "n_features": n_features})
        self.model = build_model(config.model, n_features)
        self.loss_elements = _LOSSES[config.training.loss_fn]
        self.last_step_record: Dict[str, float] = {}
        self.param_grad_norms: Optional[Dict[str, float]] = None
        # training.on_nonfinite (prot_lib.diagnostics.policies); None under "continue". Imported here:
        # prot_lib.diagnostics imports this module.
        from ..diagnostics.policies import make_guard
        self.guard = make_guard(config.training)
        #: set by ``train_fold``: the fold index and the folder for repro bundles (``<run_dir>/fold<k>``)
        self.fold: Optional[int] = None
        self.bundle_dir: Optional[Path] = None
        #: the current training batch (a reference, no copy): what a non-finite step's autopsy replays
        self.last_batch = None
        #: AutoClip/ZClip state when ``training.gradient_clip_algorithm`` is adaptive, else None
        self.clipper = make_clipper(config.training)
        self._val_sse = 0.0
        self._val_loss_sum = 0.0
        self._val_n = 0
        self.last_val_metrics: Dict[str, float] = {}

    # ------------------------------------------------------------------ forward and loss
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (batch, L, F) -> predictions (batch,)."""
        return self.model(x)

    def _step(self, batch, stage: str):
        x, y = batch
        t = self.config.training
        pred = self(x)
        sanitize = t.sanitize == "writeup"
        if sanitize:
            # The write-up's prediction check: NaN -> 0, then clamp to [-1e6, 1e6].
            nan_pred = torch.isnan(pred).any()
            self.log(f"{stage}_nan_detected", nan_pred.float(), on_step=True, on_epoch=False)
            pred = torch.where(torch.isnan(pred), torch.zeros_like(pred), pred)
            pred = torch.clamp(pred, -SANITIZE_CLAMP, SANITIZE_CLAMP)
        valid = torch.ones_like(y, dtype=torch.bool)
        if t.mask_missing_targets:
            valid = ~torch.isnan(y)
        loss_el = self.loss_elements(pred[valid], y[valid])
        raw_loss = loss_el.detach().mean() if loss_el.numel() else torch.tensor(0.0)
        if sanitize:
            # The write-up's loss check: NaN loss elements -> a large penalty.
            nan_loss = torch.isnan(loss_el).any()
            self.log(f"{stage}_loss_nan_detected", nan_loss.float(), on_step=True, on_epoch=False)
            loss_el = torch.where(torch.isnan(loss_el), torch.full_like(loss_el, SANITIZE_LOSS_FILL), loss_el)
        loss = loss_el.mean() if loss_el.numel() else (pred.sum() * 0.0)
        if sanitize:
            final_nan = torch.isnan(loss)
            self.log(f"{stage}_final_loss_nan", final_nan.float(), on_step=True, on_epoch=False)
            if final_nan:
                # The write-up's last resort: a fresh leaf tensor. It carries no graph, so no
                # parameter would receive a gradient from it (chapter 4 shows it cannot fire anyway).
                loss = torch.tensor(SANITIZE_LOSS_FILL, requires_grad=True)
        return loss, raw_loss, pred.detach(), y, valid

    def training_step(self, batch, batch_idx):
        self.last_batch = batch
        loss, raw_loss, _, _, _ = self._step(batch, "train")
        self.log("train_loss", loss.detach(), on_step=True, on_epoch=True, prog_bar=True)
        self.last_step_record = {"raw_loss": float(raw_loss), "train_loss": float(loss.detach())}
        return loss

    def validation_step(self, batch, batch_idx):
        loss, _, pred, y, valid = self._step(batch, "val")
        self.log("val_loss", loss.detach(), on_step=False, on_epoch=True, prog_bar=True)
        err = (pred[valid] - y[valid]).double()
        n = int(valid.sum())
        self._val_sse += float((err * err).sum())
        self._val_loss_sum += float(loss.detach()) * n
        self._val_n += n
        return loss

    def on_validation_epoch_start(self):
        self._val_sse, self._val_loss_sum, self._val_n = 0.0, 0.0, 0

    def on_validation_epoch_end(self):
        n = self._val_n
        rmse = math.sqrt(self._val_sse / n) if n else float("nan")
        self.last_val_metrics = {"val_loss": self._val_loss_sum / n if n else float("nan"), "val_rmse": rmse}
        self.log("val_rmse", rmse)

    # ------------------------------------------------------------------ gradients
    def on_before_optimizer_step(self, optimizer):
        """Runs after backward and BEFORE clipping (Lightning's order): it sees unclipped gradients."""
        t = self.config.training
        if t.log_param_grad_norms:
            norms = grad_norm(self, norm_type=2)
            self.param_grad_norms = {k.split("/", 1)[1] if "/" in k else k: float(v) for k, v in norms.items()}
        if t.monitor_gradients:
            # The write-up's monitoring: one isnan/isinf check per parameter.
            invalid = False
            for name, p in self.named_parameters():
                if p.grad is not None and (torch.isnan(p.grad).any() or torch.isinf(p.grad).any()):
                    invalid = True
                    self.log(f"grad_norm_{name}", p.grad.norm(), on_step=True, on_epoch=False)
            self.log("invalid_gradients_detected", float(invalid), on_step=True, on_epoch=False)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        """Lightning's clipping (``self.clip_gradients``), with the total norm measured on both sides.

        ``gradient_clip_val`` comes from ``Trainer(gradient_clip_val=...)``; it is None when the write-up's
        ``configure_optimizers`` dict carries the value instead, and then nothing is clipped.

        With ``training.gradient_clip_algorithm`` autoclip/zclip the Trainer gets no clip value (it accepts
        only "norm"/"value"); the threshold comes from :attr:`clipper` (fed this step's pre-clip norm) and
        the gradients are scaled here by ``clip_grads_with_norm_``. ``last_step_record["clip_threshold"]``
        is the bound used this step (NaN: none, e.g. no clipping or ZClip's warmup).
        """
        params = [p for p in self.parameters() if p.grad is not None]
        before = total_grad_norm(params)
        # training.on_nonfinite: the fused check, on this norm and the loss (both computed anyway). A
        # dropped step ("skip"/"rollback") has no gradients left: nothing to clip, nothing fed to a clipper.
        action = "step" if self.guard is None else self.guard.check(self, optimizer, float(before))
        if action != "step":
            threshold = math.nan
        elif self.clipper is not None:
            threshold = self.clipper.threshold(float(before))
            if params and math.isfinite(threshold):
                torch.nn.utils.clip_grads_with_norm_(params, threshold, before)
        else:
            threshold = float(gradient_clip_val) if gradient_clip_val else math.nan
            self.clip_gradients(optimizer, gradient_clip_val=gradient_clip_val,
                                gradient_clip_algorithm=gradient_clip_algorithm)
        after = total_grad_norm(params)
        self.last_step_record.update(
            grad_norm_before_clip=float(before),
            grad_norm_after_clip=float(after),
            lr=float(optimizer.param_groups[0]["lr"]),
            clip_threshold=threshold,
            action=action,
        )
        if self.clipper is not None:
            self.log("clip_threshold", threshold, on_step=True, on_epoch=False)
        self.log("grad_norm_before_clip", before, on_step=True, on_epoch=False)
        self.log("grad_norm_after_clip", after, on_step=True, on_epoch=False)

    # ------------------------------------------------------------------ optimizer
    def configure_optimizers(self):
        """AdamW (no weight decay on A_log, D and biases' ``_no_weight_decay`` params), optional
        LinearLR -> StepLR warmup via SequentialLR, and, when ``clip_via: configure_optimizers``, the
        write-up's ``gradient_clip_val`` key in the returned dict."""
        t = self.config.training
        decay, no_decay = [], []
        for p in self.parameters():
            (no_decay if getattr(p, "_no_weight_decay", False) else decay).append(p)
        groups = [{"params": decay, "weight_decay": t.weight_decay}]
        if no_decay:
            groups.append({"params": no_decay, "weight_decay": 0.0})
        opt = torch.optim.AdamW(groups, lr=t.lr)
        out: Dict[str, Any] = {"optimizer": opt}
        w = t.warmup
        if w.enabled:
            warm = LinearLR(opt, start_factor=w.start_factor, end_factor=1.0, total_iters=w.total_iters)
            main = StepLR(opt, step_size=w.step_size, gamma=w.gamma)
            sched = SequentialLR(opt, schedulers=[warm, main], milestones=[w.total_iters])
            out["lr_scheduler"] = {"scheduler": sched, "interval": w.interval, "frequency": 1}
        if t.clip_via == "configure_optimizers" and t.clip_enabled:
            out["gradient_clip_val"] = t.gradient_clip_val
        return out
