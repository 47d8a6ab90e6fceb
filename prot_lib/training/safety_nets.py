"""Config keys -> the callbacks of :mod:`prot_lib.callbacks`: the one place they are translated.

=============================================  ==============================================================
key(s)                                         becomes
=============================================  ==============================================================
``training.gradient_clip_val``,                ``Trainer(gradient_clip_val=..., gradient_clip_algorithm=...)``
``gradient_clip_algorithm: norm | value``,     (Lightning's own clipping; nothing when ``clip_via:
``clip_via: trainer``                          configure_optimizers``, the write-up's ignored dict key)
``training.gradient_clip_algorithm:            :class:`~prot_lib.callbacks.AdaptiveGradientClipping`
autoclip | zclip``, ``autoclip_percentile``,   (``gradient_clip_val`` then not given to the Trainer)
``zclip_alpha``, ``zclip_z_thresh``,
``zclip_warmup_steps``
``training.on_nonfinite: stop | skip |         :class:`~prot_lib.callbacks.NonFiniteGuard` (``max_consecutive``,
rollback``, ``max_consecutive_skips``,         ``rollback_every``, ``lr_factor``), replaying the raw loss
``rollback_every``, ``rollback_lr_factor``     (:class:`~prot_lib.training.module.RawTrainingLoss`), bundles in
                                               ``<run_dir>/fold<k>``; under skip/rollback also Lightning's
                                               ``EarlyStopping(check_finite=True)`` on ``val_loss`` as a
                                               backstop. ``continue`` (the write-up's behaviour): no guard.
``training.log_param_grad_norms``              :class:`~prot_lib.callbacks.GradNormMonitor` ``per_parameter``
                                               (the monitor itself is always there: the history's norms)
``training.checkpoint.*``                      :class:`~prot_lib.callbacks.FiniteCheckpoint` in
                                               ``<run_dir>/fold<k>/checkpoints``
``training.data_guard``                        :class:`~prot_lib.callbacks.DataGuard` (batches then carry
                                               each sample's dataset row: ``make_loaders(with_rows=True)``)
=============================================  ==============================================================

``training.sanitize``, ``monitor_gradients``, ``warmup``, ``lr``, ``weight_decay`` and ``loss_fn`` are the
write-up's fixes inside the module (:class:`~prot_lib.training.module.NaNStudyModule`), not safety nets.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

from lightning.pytorch.callbacks import EarlyStopping

from ..callbacks import AdaptiveGradientClipping, DataGuard, FiniteCheckpoint, GradNormMonitor, NonFiniteGuard
from ..compat import Callback
from ..data import SequenceData
from .config import RunConfig, TrainingConfig
from .module import RawTrainingLoss


@dataclass
class SafetyNets:
    """What :func:`safety_nets` builds for one fold.

    Attributes:
        step_callbacks: in the order they must run in each step: data guard, guard, adaptive clipping,
            monitor (the guard decides before the clipper scales; the monitor reads the norms all
            three share). A history recorder goes after them.
        end_callbacks: early stopping and checkpointing (Lightning runs checkpoint callbacks last anyway).
        trainer_kwargs: ``gradient_clip_val``, ``gradient_clip_algorithm``, ``enable_checkpointing``.
        guard, clipper, monitor, checkpoint, data_guard: the same objects, by role (None when off).
    """

    step_callbacks: List[Callback] = field(default_factory=list)
    end_callbacks: List[Any] = field(default_factory=list)
    trainer_kwargs: Dict[str, Any] = field(default_factory=dict)
    guard: Optional[NonFiniteGuard] = None
    clipper: Optional[AdaptiveGradientClipping] = None
    monitor: Optional[GradNormMonitor] = None
    checkpoint: Optional[FiniteCheckpoint] = None
    data_guard: Optional[DataGuard] = None


def early_stopping(training: TrainingConfig) -> List[EarlyStopping]:
    """``[EarlyStopping(monitor="val_loss", check_finite=True)]`` under ``skip``/``rollback``, else ``[]``.

    It only ends a fold whose validation loss is non-finite (patience is effectively infinite): the
    guard keeps the weights finite, so this catches what it cannot see, e.g. a validation batch that
    overflows. Not used under ``continue`` (the write-up trained on) nor ``stop`` (which raises first).
    """
    if training.on_nonfinite not in ("skip", "rollback"):
        return []
    return [EarlyStopping(monitor="val_loss", mode="min", check_finite=True, patience=10 ** 9, strict=False,
                          verbose=False)]


def safety_nets(config: RunConfig, fold_dir: Union[str, Path], fold: int = 0,
                data: Optional[SequenceData] = None) -> SafetyNets:
    """The callbacks and Trainer arguments ``config`` asks for, for fold ``fold`` (module docstring).

    Args:
        config: the run's configuration.
        fold_dir: ``<run_dir>/fold<k>``: repro bundles and checkpoints go there.
        fold: the fold index (kept in the guard's reports and bundles, with ``seed = training.seed + fold``).
        data: the fold's dataset (feature names, row ids, nullable features for the data guard).
    """
    t = config.training
    fold_dir = Path(fold_dir)
    nets = SafetyNets()
    if t.data_guard:
        meta = data.meta if data is not None else {}
        nets.data_guard = DataGuard(
            feature_names=None if data is None else data.feature_names, sample_index=2,
            row_ids=meta.get("row_ids"), allow_nan_targets=t.mask_missing_targets,
            declared_nullable=meta.get("nullable_features", ()))
    if t.on_nonfinite != "continue":
        name = f"{t.loss_fn}{' (NaN targets masked)' if t.mask_missing_targets else ''}"
        nets.guard = NonFiniteGuard(
            t.on_nonfinite, autopsy=True, bundle_dir=fold_dir, max_consecutive=t.max_consecutive_skips,
            rollback_every=t.rollback_every, lr_factor=t.rollback_lr_factor, replay_loss=RawTrainingLoss(name),
            trace_root="model", meta={"fold": fold, "seed": t.seed + fold})
    if t.adaptive_clip:
        nets.clipper = AdaptiveGradientClipping(
            t.gradient_clip_algorithm, percentile=t.autoclip_percentile, alpha=t.zclip_alpha,
            z_thresh=t.zclip_z_thresh, warmup_steps=t.zclip_warmup_steps)
    nets.monitor = GradNormMonitor(per_parameter=t.log_param_grad_norms)
    nets.step_callbacks = [cb for cb in (nets.data_guard, nets.guard, nets.clipper, nets.monitor) if cb is not None]
    c = t.checkpoint
    if c.enabled:
        nets.checkpoint = FiniteCheckpoint(
            dirpath=str(fold_dir / "checkpoints"), filename="{epoch}-{step}", monitor=c.monitor, mode=c.mode,
            save_top_k=c.save_top_k, save_last=c.save_last, every_n_train_steps=c.every_n_train_steps,
            enable_version_counter=False)
    nets.end_callbacks = [*early_stopping(t), *([nets.checkpoint] if nets.checkpoint else [])]
    # autoclip/zclip are applied by the callback: Lightning's Trainer rejects those algorithm names
    clip_in_trainer = t.clip_via == "trainer" and t.clip_enabled and not t.adaptive_clip
    nets.trainer_kwargs = {
        "gradient_clip_val": t.gradient_clip_val if clip_in_trainer else None,
        "gradient_clip_algorithm": t.gradient_clip_algorithm if clip_in_trainer else None,
        "enable_checkpointing": nets.checkpoint is not None,
    }
    return nets
