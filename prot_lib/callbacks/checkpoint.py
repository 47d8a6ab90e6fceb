"""Checkpoints that are always finite and never half-written: :class:`FiniteCheckpoint`.

Two guarantees, one Lightning callback (a ``ModelCheckpoint`` subclass, same arguments):

- **finite**: nothing is written while the model's weights, the optimizer's state or the monitored
  metric hold a non-finite value. The check runs *before* Lightning's top-k bookkeeping, so a refused
  save never evicts (deletes) a good checkpoint: the best and the ``last.ckpt`` on disk stay the last
  good ones. Refusals are counted in :attr:`FiniteCheckpoint.refused`.
- **atomic**: each file is written to a temporary file in its folder, fsynced, then ``os.replace``-d
  over the target (:func:`prot_lib.utils.io.atomic_path`): a reader (or a crash) sees the old file or the
  new one, never a partial one, whatever ``CheckpointIO`` plugin the Trainer uses.

Lightning's own ``ModelCheckpoint`` saves a NaN model whenever it is asked (a NaN ``monitor`` value is
only ranked as the worst score), and its ``TorchCheckpointIO`` writes in place (Lightning 2.6,
``lightning/fabric/utilities/cloud_io.py: _atomic_save`` buffers in memory, then writes the target
directly).

Both Lightning namespaces: the class is a ``lightning.pytorch`` ``ModelCheckpoint`` and, when
``pytorch_lightning`` is installed, also a ``pytorch_lightning.callbacks.Checkpoint`` (:mod:`prot_lib.compat`),
so both Trainers recognise it as their checkpoint callback. (Under a ``pytorch_lightning`` Trainer,
``fit(ckpt_path="last")`` looks only for its own ``ModelCheckpoint`` class and will not find these
files: pass the path instead.)
"""
from __future__ import annotations

import math
from typing import Any, Dict, Iterator, List, Optional, Tuple
from weakref import proxy

import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.pytorch.callbacks import ModelCheckpoint

from ..utils.io import atomic_path
from ..compat import CHECKPOINT_MARKERS


class NonFiniteCheckpointError(RuntimeError):
    """A checkpoint about to be written holds a non-finite tensor (names the first one)."""


def _tensors(obj: Any, prefix: str = "") -> Iterator[Tuple[str, torch.Tensor]]:
    """(path, tensor) for every tensor nested in dicts/lists/tuples."""
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _tensors(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _tensors(v, f"{prefix}.{i}" if prefix else str(i))


def first_nonfinite(obj: Any, prefix: str = "") -> Optional[str]:
    """Path of the first floating-point tensor in ``obj`` holding inf or NaN (e.g.
    ``weights.model.head.weight``); None when all are finite. One fused reduction per tensor."""
    for path, t in _tensors(obj, prefix):
        if (t.is_floating_point() or t.is_complex()) and not bool(torch.isfinite(t).all()):
            return path
    return None


class FiniteCheckpoint(ModelCheckpoint, *CHECKPOINT_MARKERS):  # type: ignore[misc]
    """``ModelCheckpoint`` that never writes a non-finite model, optimizer state or monitored metric,
    and never leaves a half-written file.

    Same arguments as Lightning's ``ModelCheckpoint``. Every save Lightning decides on (top-k, last,
    on exception) first checks, once per global step:

    - every parameter and buffer of the LightningModule is finite;
    - every tensor of every optimizer's state (Adam's ``exp_avg``, ``exp_avg_sq``) is finite;
    - the ``monitor`` value, when there is one and it has been logged, is finite.

    A failed check skips the save, including the bookkeeping that would delete the previous best or
    last file, and appends ``(global_step, reason)`` to :attr:`refused`. A passed check writes through
    :func:`prot_lib.utils.io.atomic_path` (one process on a local filesystem; a remote ``dirpath`` or a
    multi-process strategy is written as Lightning writes it).

    Overrides Lightning's ``_save_topk_checkpoint``, ``_save_last_checkpoint`` and ``_save_checkpoint``
    (the three paths through which ``ModelCheckpoint`` 2.x writes); covered by ``tests/test_checkpoint.py``
    (fault injection) and ``tests/test_callbacks.py`` (both namespaces).

    Example::

        trainer = Trainer(callbacks=[FiniteCheckpoint(dirpath="ckpt", monitor="val_loss", save_last=True)])
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.refused: List[Tuple[int, str]] = []
        self._verdict: Tuple[int, Optional[str]] = (-1, None)

    def nonfinite_reason(self, trainer, monitor_candidates: Optional[Dict[str, Any]] = None) -> Optional[str]:
        """Why the current state must not be saved (e.g. ``"weights.model.head.weight"``), or None."""
        step = int(trainer.global_step)
        if self._verdict[0] != step:
            module = trainer.lightning_module
            reason = first_nonfinite(dict(module.state_dict()), "weights")
            if reason is None:
                reason = first_nonfinite([opt.state_dict()["state"] for opt in trainer.optimizers], "optimizer")
            self._verdict = (step, reason)
        reason = self._verdict[1]
        if reason is None and self.monitor is not None:
            value = (monitor_candidates if monitor_candidates is not None else trainer.callback_metrics).get(self.monitor)
            if value is not None and not math.isfinite(float(value)):
                reason = f"monitored {self.monitor} = {float(value)}"
        return reason

    def _refuse(self, trainer, monitor_candidates: Optional[Dict[str, Any]]) -> bool:
        reason = self.nonfinite_reason(trainer, monitor_candidates)
        if reason is not None:
            if not self.refused or self.refused[-1] != (int(trainer.global_step), reason):
                self.refused.append((int(trainer.global_step), reason))
            return True
        return False

    def _save_topk_checkpoint(self, trainer, monitor_candidates) -> None:
        if not self._refuse(trainer, monitor_candidates):
            super()._save_topk_checkpoint(trainer, monitor_candidates)

    def _save_last_checkpoint(self, trainer, monitor_candidates) -> None:
        if not self._refuse(trainer, monitor_candidates):
            super()._save_last_checkpoint(trainer, monitor_candidates)

    def _save_checkpoint(self, trainer, filepath: str) -> None:
        # direct calls (on_exception) come here without the checks above
        if self._refuse(trainer, None):
            return
        if not isinstance(self._fs, LocalFileSystem) or trainer.world_size > 1:
            # remote storage, or a multi-process strategy (sharded checkpoints may be folders written by
            # every rank): written as Lightning writes it
            super()._save_checkpoint(trainer, filepath)
            return
        # ModelCheckpoint._save_checkpoint (Lightning 2.6), with the write made atomic
        with atomic_path(filepath) as tmp:
            trainer.save_checkpoint(str(tmp), self.save_weights_only)
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.after_save_checkpoint(proxy(self))
