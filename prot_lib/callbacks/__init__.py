"""The safety nets as drop-in Lightning callbacks, for any LightningModule.

==============================  ===========================================================================
callback                        what it does
==============================  ===========================================================================
:class:`NonFiniteGuard`         a non-finite loss or gradient: ``stop`` (raise :class:`NonFiniteTrainingError`
                                with an autopsy and a repro bundle), ``skip`` the update, or ``rollback`` to
                                the last good weights and optimizer state with a smaller lr
:class:`GradNormMonitor`        total (and per-parameter) gradient norms before and after clipping
:class:`AdaptiveGradientClipping`  AutoClip / ZClip thresholds, state kept in checkpoints
:class:`FiniteCheckpoint`       a ``ModelCheckpoint`` that writes atomically and never a non-finite model
:class:`DataGuard`              the first non-finite input or target names the batch, sample and feature
:class:`DeltaMonitor`           Mamba's step size delta = softplus(dt_proj(x) + bias), median and max per
                                block, every N steps (hooks only on the steps it logs)
==============================  ===========================================================================

Use them on your own model::

    from lightning.pytorch import Trainer          # or: from pytorch_lightning import Trainer
    from prot_lib.callbacks import (AdaptiveGradientClipping, DataGuard, FiniteCheckpoint,
                                    GradNormMonitor, NonFiniteGuard)

    trainer = Trainer(gradient_clip_val=1.0, callbacks=[
        DataGuard(), NonFiniteGuard("rollback"), GradNormMonitor(),
        FiniteCheckpoint(dirpath="ckpt", monitor="val_loss")])
    trainer.fit(my_module, train_loader, val_loader)

Every class is a ``lightning.pytorch.Callback`` and, when ``pytorch_lightning`` is installed, a
``pytorch_lightning.Callback`` too (:mod:`prot_lib.compat`), so either Trainer accepts it. They need
automatic optimization (Lightning's default). The guard, the monitor and the clipper share one
measurement of the pre-clip gradient norms per step (:mod:`prot_lib.diagnostics.grads`). The book's own
runs build the same callbacks from their config keys in one place,
:func:`prot_lib.training.safety_nets.safety_nets`.
"""
from ..diagnostics.autopsy import NonFiniteTrainingError
from .checkpoint import FiniteCheckpoint, NonFiniteCheckpointError, first_nonfinite
from .clipping import ALGORITHMS, AdaptiveGradientClipping, AutoClip, ZClip
from .data import DataGuard
from .delta_monitor import DeltaMonitor
from .guard import ACTIONS, POLICIES, NonFiniteGuard
from .monitor import GradNormMonitor

__all__ = [
    "NonFiniteGuard", "NonFiniteTrainingError", "GradNormMonitor", "AdaptiveGradientClipping", "AutoClip",
    "ZClip", "FiniteCheckpoint", "NonFiniteCheckpointError", "DataGuard", "DeltaMonitor", "POLICIES", "ACTIONS", "ALGORITHMS",
    "first_nonfinite",
]
