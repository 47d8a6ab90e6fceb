"""Checkpoints that are always finite and never half-written: ``training.checkpoint``.

Two guarantees, each from one class:

- :class:`FiniteModelCheckpoint` (a Lightning ``ModelCheckpoint``) writes nothing while the model's
  weights, the optimizer's state or the monitored metric hold a non-finite value. It refuses *before*
  Lightning's top-k bookkeeping runs, so a refused save never evicts (deletes) a good checkpoint:
  the best and the ``last.ckpt`` on disk stay the last good ones. Refusals are counted in
  :attr:`FiniteModelCheckpoint.refused`.
- :class:`AtomicCheckpointIO` (a Lightning ``CheckpointIO`` plugin) writes to a temporary file in the
  target's folder, flushes and fsyncs it, then ``os.replace``-s it over the target: a reader (or a
  crash) sees the old file or the new one, never a partial one. As a last line of defence it raises
  :class:`NonFiniteCheckpointError` rather than write a checkpoint holding a non-finite tensor in
  ``state_dict`` or ``optimizer_states``.

Lightning's own ``ModelCheckpoint`` saves a NaN model whenever it is asked (a NaN ``monitor`` value is
only ranked as the worst score), and its ``TorchCheckpointIO`` writes in place. Both are swapped in by
:func:`checkpoint_callbacks` when ``training.checkpoint.enabled`` is true (off by default: runs write no
checkpoint files unless asked). :func:`load_checkpoint` reads one back as a :class:`NaNStudyModule`.
"""
from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple, Union

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from .config import RunConfig, config_from_dict


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
    ``state_dict.model.head.weight``); None when all are finite. One fused reduction per tensor."""
    for path, t in _tensors(obj, prefix):
        if (t.is_floating_point() or t.is_complex()) and not bool(torch.isfinite(t).all()):
            return path
    return None


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` to ``<dir>/.<name>.<random>.tmp``, fsync, then ``os.replace`` onto the target.

    Raises:
        NonFiniteCheckpointError: the checkpoint's ``state_dict`` or ``optimizer_states`` hold a
            non-finite tensor (nothing is written; with :class:`FiniteModelCheckpoint` this never
            happens, it refuses first).
    """

    def save_checkpoint(self, checkpoint: Dict[str, Any], path, storage_options: Optional[Any] = None) -> None:
        bad = first_nonfinite({"state_dict": checkpoint.get("state_dict", {}),
                               "optimizer_states": checkpoint.get("optimizer_states", [])})
        if bad is not None:
            raise NonFiniteCheckpointError(f"refusing to write {path}: {bad} is not finite")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise


class FiniteModelCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` that never writes a non-finite model, optimizer state or monitored metric.

    Same arguments as Lightning's ``ModelCheckpoint``. Every save Lightning decides on (top-k, last,
    on exception) first checks, once per global step:

    - every parameter and buffer of the LightningModule is finite;
    - every tensor of every optimizer's state (Adam's ``exp_avg``, ``exp_avg_sq``) is finite;
    - the ``monitor`` value, when there is one and it has been logged, is finite.

    A failed check skips the save, including the bookkeeping that would delete the previous best or
    last file, and appends ``(global_step, reason)`` to :attr:`refused`.

    Overrides Lightning's ``_save_topk_checkpoint``, ``_save_last_checkpoint`` and ``_save_checkpoint``
    (the three paths through which ``ModelCheckpoint`` 2.x writes); covered by ``tests/test_checkpoint.py``.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.refused: List[Tuple[int, str]] = []
        self._verdict: Tuple[int, Optional[str]] = (-1, None)

    def nonfinite_reason(self, trainer: "pl.Trainer", monitor_candidates: Optional[Dict[str, Any]] = None) -> Optional[str]:
        """Why the current state must not be saved (e.g. ``"weights: model.head.weight"``), or None."""
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

    def _refuse(self, trainer: "pl.Trainer", monitor_candidates: Optional[Dict[str, Any]]) -> bool:
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
        if not self._refuse(trainer, None):
            super()._save_checkpoint(trainer, filepath)


def checkpoint_callbacks(config: RunConfig, fold_dir: Union[str, Path]) -> Tuple[List[pl.Callback], list]:
    """``(callbacks, plugins)`` for ``pl.Trainer`` from ``training.checkpoint``; ``([], [])`` when disabled.

    Files: ``<fold_dir>/checkpoints/{epoch}-{step}.ckpt`` (top-k by ``monitor``, or the latest when
    ``monitor`` is null) and ``last.ckpt``.
    """
    c = config.training.checkpoint
    if not c.enabled:
        return [], []
    cb = FiniteModelCheckpoint(
        dirpath=str(Path(fold_dir) / "checkpoints"), filename="{epoch}-{step}", monitor=c.monitor, mode=c.mode,
        save_top_k=c.save_top_k, save_last=c.save_last, every_n_train_steps=c.every_n_train_steps,
        enable_version_counter=False,
    )
    return [cb], [AtomicCheckpointIO()]


def load_checkpoint(path: Union[str, Path]) -> "pl.LightningModule":
    """A checkpoint written by a ``NaNStudyModule`` run, as a ``NaNStudyModule`` in eval mode.

    Reads the config and ``n_features`` from the checkpoint's hyper-parameters (``save_hyperparameters``
    stores the config as a dict; Lightning's ``load_from_checkpoint`` would pass that dict where the
    module expects a :class:`RunConfig`).

    Raises:
        FileNotFoundError: no such file.
        KeyError: not a ``NaNStudyModule`` checkpoint (no ``hyper_parameters.config``).
    """
    from .module import NaNStudyModule

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    hp = ckpt["hyper_parameters"]
    with torch.random.fork_rng(devices=[]):  # building the module draws initial weights
        module = NaNStudyModule(config_from_dict(hp["config"], source=str(path)), n_features=int(hp["n_features"]))
    module.load_state_dict(ckpt["state_dict"])
    return module.eval()
