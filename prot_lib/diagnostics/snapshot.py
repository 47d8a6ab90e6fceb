"""Callbacks that watch a training run and keep what a NaN autopsy needs.

- :class:`NonfiniteSnapshot` keeps the model state and the batch of the first optimizer step that
  went non-finite (the state *before* that step), so that the step can be traced afterwards with
  :func:`trace_snapshot` (:func:`prot_lib.diagnostics.trace_nonfinite` on the rebuilt model).
- :class:`ScaleRecorder` records max |output| of chosen submodules at every training step (e.g. the
  prediction), to show a scale growing for decades before it overflows.

Typical use, on the one fold that diverged::

    snap = NonfiniteSnapshot()
    run_kfold(cfg, folds=[k], callbacks=[snap])     # callbacks are never cached
    report = trace_snapshot(snap.snapshot, cfg)    # where was the first non-finite value born?
    print(report)

Both callbacks follow Lightning's counting: ``step`` is ``trainer.global_step`` before the optimizer
step (0 for the first step of a fold, as in ``KFoldResult.history``), ``epoch`` is
``trainer.current_epoch``; ``fold`` is read from the run's ``HistoryRecorder`` (None without one).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Optional, Sequence

import lightning.pytorch as pl
import pandas as pd
import torch

from ..training.config import RunConfig
from ..training.history import params_all_finite
from ..training.module import NaNStudyModule
from .trace import TraceReport, tensor_stats, trace_nonfinite


def _clone(obj: Any) -> Any:
    """Detached copies of every tensor in a (nested) batch; other objects as they are."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, (list, tuple)):
        return type(obj)(_clone(o) for o in obj)
    if isinstance(obj, dict):
        return {k: _clone(v) for k, v in obj.items()}
    return obj


def _fold_of(trainer: pl.Trainer, me: pl.Callback) -> Optional[int]:
    for cb in trainer.callbacks:
        if cb is not me and isinstance(getattr(cb, "fold", None), int):
            return cb.fold
    return None


class NonfiniteSnapshot(pl.Callback):
    """Keep the state before the first optimizer step whose loss, gradient or parameters went non-finite.

    At every ``on_train_batch_start`` it copies the LightningModule's ``state_dict`` and the batch
    (cheap here: the S6Regressor of the book has ~30k parameters). At ``on_train_batch_end``, after the
    optimizer step, it checks:

    - ``pl_module.last_step_record["raw_loss"]`` (loss before any sanitisation),
    - ``pl_module.last_step_record["grad_norm_before_clip"]`` (total gradient L2 norm, unclipped),
    - every parameter after the step;

    (a key missing from ``last_step_record`` is not checked, so any LightningModule works, with the
    parameter check at least). At the first failing step it stores :attr:`snapshot` and stops copying.
    Steps where no optimizer step happened are ignored.

    Attributes:
        snapshot: None until a step fails, then a dict:
            ``fold`` (int or None), ``step`` (global_step before the failing step), ``epoch``,
            ``state_dict`` (the module's weights BEFORE that step: the step's forward and backward
            run on these), ``batch`` (the step's batch, e.g. ``(x, y)``), ``record`` (the module's
            ``last_step_record`` of that step) and ``reasons`` (list, subset of "loss", "grad",
            "params": what was non-finite).

    One instance serves a whole ``run_kfold``: it keeps the first failure of the first fold that fails.
    """

    def __init__(self) -> None:
        self.snapshot: Optional[Dict[str, Any]] = None
        self._pending: Optional[Dict[str, Any]] = None

    def on_fit_start(self, trainer, pl_module) -> None:
        self._pending = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.snapshot is not None:
            return
        self._pending = {
            "step": int(trainer.global_step),
            "epoch": int(trainer.current_epoch),
            "state_dict": {k: v.detach().clone() for k, v in pl_module.state_dict().items()},
            "batch": _clone(batch),
        }

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        pending = self._pending
        if self.snapshot is not None or pending is None or trainer.global_step == pending["step"]:
            return
        record = dict(getattr(pl_module, "last_step_record", {}) or {})
        reasons = []
        if "raw_loss" in record and not math.isfinite(record["raw_loss"]):
            reasons.append("loss")
        if "grad_norm_before_clip" in record and not math.isfinite(record["grad_norm_before_clip"]):
            reasons.append("grad")
        if not params_all_finite(pl_module):
            reasons.append("params")
        if reasons:
            self.snapshot = dict(fold=_fold_of(trainer, self), record=record, reasons=reasons, **pending)
            self._pending = None


class ScaleRecorder(pl.Callback):
    """Record max |output| (finite elements) of chosen submodules at every training forward pass.

    Args:
        names: submodule names relative to the LightningModule, as ``get_submodule`` takes them:
            ``"model"`` (the S6Regressor: its output is the prediction), ``"model.embedding"``,
            ``"model.bimamba.layers.3"``, ... (default: ``("model",)``).

    Attributes:
        rows: list of dicts ``fold, epoch, step, module, max_abs, nonfinite`` (``nonfinite``: number
            of non-finite output elements); :attr:`table` gives them as a DataFrame.

    Only training passes are recorded (validation runs in eval mode). Cost: one max/isfinite
    reduction per recorded module per step.
    """

    def __init__(self, names: Sequence[str] = ("model",)) -> None:
        self.names = list(names)
        self.rows: List[Dict[str, Any]] = []
        self._handles: list = []
        self._fold: Optional[int] = None

    @property
    def table(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows, columns=["fold", "epoch", "step", "module", "max_abs", "nonfinite"])

    def _hook(self, trainer, name: str) -> Callable:
        def hook(module, args, output) -> None:
            if not module.training:
                return
            m, bad, _ = tensor_stats([output] if isinstance(output, torch.Tensor) else [])
            self.rows.append({"fold": self._fold, "epoch": int(trainer.current_epoch),
                              "step": int(trainer.global_step), "module": name, "max_abs": m, "nonfinite": bad})
        return hook

    def on_fit_start(self, trainer, pl_module) -> None:
        self._fold = _fold_of(trainer, self)
        for name in self.names:
            sub = pl_module.get_submodule(name)
            self._handles.append(sub.register_forward_hook(self._hook(trainer, name)))

    def on_fit_end(self, trainer, pl_module) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


# ---------------------------------------------------------------------------------- autopsy helpers

def snapshot_module(snapshot: Dict[str, Any], config: RunConfig) -> NaNStudyModule:
    """The :class:`NaNStudyModule` of ``config`` with the snapshot's weights (``strict=True``).

    ``n_features`` is read from the snapshot's batch ``x: (batch, L, F)``.

    Raises:
        ValueError: ``snapshot`` is None (no step went non-finite).
        RuntimeError: the state_dict does not fit the config's model (``load_state_dict``).
    """
    if snapshot is None:
        raise ValueError("no snapshot: no optimizer step went non-finite in the run")
    x = snapshot["batch"][0]
    module = NaNStudyModule(config, n_features=int(x.shape[-1]))
    module.load_state_dict(snapshot["state_dict"], strict=True)
    return module


def module_loss_fn(module: NaNStudyModule) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The raw training loss exactly as ``NaNStudyModule._step`` computes it before any sanitisation:
    ``mean(loss_elements(pred[valid], y[valid]))``, ``valid`` = target not NaN when
    ``training.mask_missing_targets`` is on, else every element. pred, y: (batch,) -> scalar."""
    mask = module.config.training.mask_missing_targets
    name = module.config.training.loss_fn

    def loss_fn(pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        valid = ~torch.isnan(y) if mask else torch.ones_like(y, dtype=torch.bool)
        return module.loss_elements(pred[valid], y[valid]).mean()

    loss_fn.__name__ = f"{name}{' (NaN targets masked)' if mask else ''}"
    return loss_fn


def trace_snapshot(snapshot: Dict[str, Any], config: RunConfig) -> TraceReport:
    """Trace the failing step of a :class:`NonfiniteSnapshot`: the model with the weights it had
    before that step, on that step's batch ``(x, y)``, with the config's raw loss.

    Module names in the report are relative to the S6Regressor (``embedding``, ``bimamba.layers.0...``,
    ``head``). Raises as :func:`snapshot_module`.
    """
    module = snapshot_module(snapshot, config)
    module.train()
    x, y = snapshot["batch"][0], snapshot["batch"][1]
    return trace_nonfinite(module.model, x, y, module_loss_fn(module))
