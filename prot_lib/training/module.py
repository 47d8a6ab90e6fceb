"""The LightningModule: a BiMamba regressor whose every fix from the write-up is a config switch.

The step follows the write-up's ``_step`` (proT ``baseline_pl_modules.py`` as described in
``shared/seeds``) when ``training.sanitize: writeup``; gradient monitoring follows its
``on_before_optimizer_step``. Clipping happens where Lightning really applies it
(``Trainer(gradient_clip_val=...)``, Lightning's own ``configure_gradient_clipping``, not overridden
here), or, behind ``training.clip_via: configure_optimizers``, where the write-up put it: a
``gradient_clip_val`` key in the dict returned by :meth:`configure_optimizers`, which Lightning 2.x only
warns about ("Found unsupported keys in the optimizer configuration") and never applies.

The safety nets (guard, gradient-norm monitor, adaptive clipping, finite checkpoints, data guard) are
not in this class: they are the callbacks of :mod:`prot_lib.callbacks`, which work on any
LightningModule; :mod:`prot_lib.training.safety_nets` builds them from the config for
:func:`prot_lib.training.run_kfold`. This module only exposes what they need of it: the raw loss of
a step (:meth:`NaNStudyModule.raw_loss`, replayed by the autopsy as :class:`RawTrainingLoss`).
"""
from __future__ import annotations

import functools
import math
from typing import Any, Dict, List, Mapping, Optional, Union

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.lr_scheduler import LinearLR, SequentialLR, StepLR

from ..diagnostics.grads import total_grad_norm
from ..models import Mamba, build_model
from .config import RunConfig, config_from_dict

__all__ = ["NaNStudyModule", "RawTrainingLoss", "parameter_groups", "ssm_parameters", "total_grad_norm", "SANITIZE_CLAMP",
           "SANITIZE_LOSS_FILL", "NO_DECAY_MODULES"]

#: the write-up's sanitisation constants
SANITIZE_CLAMP = 1e6
SANITIZE_LOSS_FILL = 1e6

# element-wise losses (module-level partials, so a module can be pickled)
_LOSSES = {
    "mse": functools.partial(F.mse_loss, reduction="none"),
    "mae": functools.partial(F.l1_loss, reduction="none"),
    "huber": functools.partial(F.huber_loss, reduction="none", delta=1.0),
}

#: modules whose parameters get no weight decay (the normalisation layers)
NO_DECAY_MODULES = (nn.LayerNorm, nn.RMSNorm, nn.GroupNorm, nn.LocalResponseNorm,
                    nn.modules.batchnorm._NormBase)


def ssm_parameters(module: nn.Module) -> List[nn.Parameter]:
    """The selective-SSM parameters of every :class:`prot_lib.models.Mamba` block in ``module``:
    ``A_log`` (d_inner, d_state), ``D`` (d_inner,), ``dt_proj.weight`` (d_inner, dt_rank) and
    ``dt_proj.bias`` (d_inner,): the ones that set delta = softplus(dt_proj(x) + dt_proj.bias) and
    A_bar = exp(delta * A). In module order; each parameter once."""
    seen: Dict[int, nn.Parameter] = {}
    for mod in module.modules():
        if isinstance(mod, Mamba):
            for p in (mod.A_log, mod.D, mod.dt_proj.weight, mod.dt_proj.bias):
                seen.setdefault(id(p), p)
    return list(seen.values())


def parameter_groups(module: nn.Module, weight_decay: float, ssm_lr: Optional[float] = None) -> List[Dict[str, Any]]:
    """AdamW parameter groups following mamba-ssm's training recipe: no weight decay on biases
    (``dt_proj.bias`` included), on normalisation weights, and on parameters marked
    ``_no_weight_decay`` (``A_log``, ``D``: :class:`prot_lib.models.Mamba`); decay on everything else
    (the weight matrices and the conv kernel).

    Mirrors ``group_parameters_for_optimizer(bias_weight_decay=False, normalization_weight_decay=False)``
    of the Mamba authors' training code (Dao-AILab/flash-attention, ``training/src/optim/param_grouping.py``),
    which honours ``_no_weight_decay`` and exempts ``*bias`` and the normalisation modules.

    Args:
        module: the model (or the LightningModule holding it).
        weight_decay: AdamW's decoupled weight decay of the decayed group.
        ssm_lr: None (default): one lr for all, the groups carry no ``lr`` key and take the optimizer's.
            A float: the SSM parameters (:func:`ssm_parameters`) move to groups of their own with
            ``"lr": ssm_lr`` (per optimizer step), keeping their weight decay (``dt_proj.weight``
            decayed, the others exempt), so the SSM's lr is the only thing that changes.

    Returns:
        ``[{"params": decayed, "weight_decay": weight_decay, "names": [...]},
        {"params": exempt, "weight_decay": 0.0, "names": [...]}]`` (the second only when non-empty); with
        ``ssm_lr`` then the SSM groups, ``{"params", "weight_decay", "lr": ssm_lr, "names", "ssm": True}``
        (exempt: A_log, D, dt_proj.bias; decayed: dt_proj.weight; each only when non-empty). Each group's
        ``names`` lists its parameters' qualified names in module order (torch optimizers keep extra
        keys of a group). Schedulers (LinearLR, StepLR, SequentialLR) keep one ``initial_lr`` per group
        and multiply each by the same factor, so warmup scales every group alike.
    """
    ssm = {id(p) for p in ssm_parameters(module)} if ssm_lr is not None else set()
    # (decayed?, ssm?) -> (names, params)
    buckets: Dict[tuple, tuple] = {(d, s): ([], []) for d in (True, False) for s in (False, True)}
    for mod_name, mod in module.named_modules():
        for p_name, p in mod.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            exempt = (getattr(p, "_no_weight_decay", False) or p_name.endswith("bias")
                      or isinstance(mod, NO_DECAY_MODULES))
            names, params = buckets[(not exempt, id(p) in ssm)]
            names.append(f"{mod_name}.{p_name}" if mod_name else p_name)
            params.append(p)
    decay, no_decay = buckets[(True, False)], buckets[(False, False)]
    groups = [{"params": decay[1], "weight_decay": weight_decay, "names": decay[0]}]
    if no_decay[1]:
        groups.append({"params": no_decay[1], "weight_decay": 0.0, "names": no_decay[0]})
    for decayed in (False, True):
        names, params = buckets[(decayed, True)]
        if params:
            groups.append({"params": params, "weight_decay": weight_decay if decayed else 0.0,
                           "lr": float(ssm_lr), "names": names, "ssm": True})
    return groups


class NaNStudyModule(pl.LightningModule):
    """S6Regressor + loss + optimizer, with the write-up's fixes as switches.

    Args:
        config: the validated :class:`RunConfig`, or its dict (``RunConfig.to_dict()``, what
            ``save_hyperparameters`` stores: so Lightning's ``load_from_checkpoint`` and the autopsy can
            rebuild the module from its hyper-parameters).
        n_features: F, the width of each token of the input ``x: (batch, L, F)``.

    Batches are ``(x, y)`` or ``(x, y, rows)`` with ``x: (batch, L, F) float32``, ``y: (batch,) float32``
    (raw units of the target) and ``rows`` the dataset rows (read by the data guard only). Logged
    metrics: ``train_loss``, ``val_loss``, ``val_rmse`` (target units), and with sanitisation on the
    write-up's ``{stage}_nan_detected``, ``{stage}_loss_nan_detected``, ``{stage}_final_loss_nan``; with
    monitoring on ``invalid_gradients_detected`` and ``grad_norm_{param_name}`` (the write-up's names:
    the pre-clip norm of each parameter whose gradient is non-finite).

    After every training step, :attr:`last_step_record` holds ``raw_loss`` (the loss before any
    sanitisation: NaN predictions are not replaced in it) and ``train_loss`` (the loss that was
    back-propagated and logged), read by :class:`prot_lib.training.history.HistoryRecorder`.

    Raises:
        ConfigError: ``config`` is a dict that does not validate.
    """

    def __init__(self, config: Union[RunConfig, Mapping[str, Any]], n_features: int):
        super().__init__()
        if not isinstance(config, RunConfig):
            config = config_from_dict(config, source="NaNStudyModule hyper-parameters")
        self.config = config
        self.save_hyperparameters({"config": config.to_dict(), "n_features": n_features})
        self.model = build_model(config.model, n_features)
        self.loss_elements = _LOSSES[config.training.loss_fn]
        self.last_step_record: Dict[str, float] = {}
        self._val_sse = 0.0
        self._val_loss_sum = 0.0
        self._val_n = 0
        self.last_val_metrics: Dict[str, float] = {}

    # ------------------------------------------------------------------ forward and loss
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (batch, L, F) -> predictions (batch,)."""
        return self.model(x)

    def _valid(self, y: torch.Tensor) -> torch.Tensor:
        """Targets that enter the loss: all, or the non-NaN ones (``training.mask_missing_targets``)."""
        if self.config.training.mask_missing_targets:
            return ~torch.isnan(y)
        return torch.ones_like(y, dtype=torch.bool)

    def raw_loss(self, batch) -> torch.Tensor:
        """The training loss before any sanitisation: ``mean(loss_elements(pred[valid], y[valid]))``
        on the unmodified predictions (scalar, with its graph). What the autopsy replays."""
        x, y = batch[0], batch[1]
        valid = self._valid(y)
        return self.loss_elements(self(x)[valid], y[valid]).mean()

    def _step(self, batch, stage: str):
        x, y = batch[0], batch[1]
        t = self.config.training
        pred = self(x)
        valid = self._valid(y)
        sanitize = t.sanitize == "writeup"
        # the TRUE raw loss: before the write-up's prediction replacement, clamp and loss fill
        with torch.set_grad_enabled(not sanitize and torch.is_grad_enabled()):
            raw_el = self.loss_elements(pred[valid], y[valid])
        raw_loss = raw_el.detach().mean() if raw_el.numel() else torch.tensor(0.0)
        if not sanitize:
            loss_el = raw_el
        else:
            # The write-up's prediction check: NaN -> 0, then clamp to [-1e6, 1e6].
            nan_pred = torch.isnan(pred).any()
            self.log(f"{stage}_nan_detected", nan_pred.float(), on_step=True, on_epoch=False)
            pred = torch.where(torch.isnan(pred), torch.zeros_like(pred), pred)
            pred = torch.clamp(pred, -SANITIZE_CLAMP, SANITIZE_CLAMP)
            loss_el = self.loss_elements(pred[valid], y[valid])
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
                # parameter would receive a gradient from it (chapter 5 shows it cannot fire anyway).
                loss = torch.tensor(SANITIZE_LOSS_FILL, requires_grad=True)
        return loss, raw_loss, pred.detach(), y, valid

    def training_step(self, batch, batch_idx):
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
        """The write-up's monitoring (``training.monitor_gradients``): one isnan/isinf check per parameter,
        and ``grad_norm_{name}`` logged for each parameter whose gradient is non-finite. Lightning runs
        this hook after backward and BEFORE clipping: the norms are pre-clip."""
        if not self.config.training.monitor_gradients:
            return
        invalid = False
        for name, p in self.named_parameters():
            if p.grad is not None and (torch.isnan(p.grad).any() or torch.isinf(p.grad).any()):
                invalid = True
                self.log(f"grad_norm_{name}", p.grad.norm(), on_step=True, on_epoch=False)
        self.log("invalid_gradients_detected", float(invalid), on_step=True, on_epoch=False)

    # ------------------------------------------------------------------ optimizer
    def configure_optimizers(self):
        """AdamW over :func:`parameter_groups` (no weight decay on biases, norm weights, A_log, D; the
        SSM parameters at ``lr * ssm_lr_scale`` when ``training.ssm_lr_scale != 1``), optional
        LinearLR -> StepLR warmup via SequentialLR (per-group factors, so the SSM groups keep their
        ratio), and, when ``clip_via: configure_optimizers``, the write-up's ``gradient_clip_val`` key
        in the returned dict."""
        t = self.config.training
        # scale 1.0: no SSM groups at all, so every existing run's optimizer is the one it always had
        ssm_lr = None if t.ssm_lr_scale == 1.0 else t.lr * t.ssm_lr_scale
        opt = torch.optim.AdamW(parameter_groups(self, t.weight_decay, ssm_lr=ssm_lr), lr=t.lr)
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


class RawTrainingLoss:
    """``RawTrainingLoss(name)(module, batch)``: :meth:`NaNStudyModule.raw_loss`, the loss the autopsy
    replays (the guard's ``replay_loss``). A picklable class, so repro bundles can hold it; ``name``
    (``"mse"``, ``"mse (NaN targets masked)"``) is what the report calls the loss."""

    def __init__(self, name: str = "loss") -> None:
        self.__name__ = name

    def __call__(self, module: NaNStudyModule, batch) -> torch.Tensor:
        return module.raw_loss(batch)

    def __repr__(self) -> str:
        return f"RawTrainingLoss({self.__name__!r})"
