"""Callbacks that watch a training run and keep what a NaN autopsy needs.

- :class:`NonfiniteSnapshot` keeps the model state and the batch of the first optimizer step that
  went non-finite (the state *before* that step), so that the step can be traced afterwards
  (``prot_lib.training.trace_snapshot`` for the book's module, :func:`prot_lib.diagnostics.trace_nonfinite`
  for any model).
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
Both work on any LightningModule, under ``lightning.pytorch`` and ``pytorch_lightning``
(:mod:`prot_lib.compat`). :func:`clone_batch` is the one batch-copying helper of the library.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Optional, Sequence

import pandas as pd
import torch

from ..compat import Callback
from .grads import forget, pre_clip_grad_norms, track
from .trace import tensor_stats


def clone_batch(obj: Any) -> Any:
    """Detached copies of every tensor in a (nested) batch; other objects as they are.
    Tuples, lists and dicts keep their type (named tuples included)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(clone_batch(o) for o in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(clone_batch(o) for o in obj)
    if isinstance(obj, dict):
        return type(obj)((k, clone_batch(v)) for k, v in obj.items())
    return obj


def params_all_finite(module: torch.nn.Module) -> bool:
    """True when every parameter of ``module`` is finite (True for a module without parameters).

    The parameters of each (device, dtype) are flattened into one tensor and checked with one
    ``isfinite().all()`` and one host sync, instead of one each per parameter: the book's
    HistoryRecorder calls this after every optimizer step, and with 77 small parameter tensors the
    per-parameter loop cost about 6 ms of a 90 ms step (cProfile of one 250-step Ishigami fold of the
    stacks reproduction). The copy is the parameters' size (4 bytes a float32 parameter)."""
    groups: dict = {}
    for p in module.parameters():
        groups.setdefault((p.device, p.dtype), []).append(p.detach().reshape(-1))
    return all(bool(torch.isfinite(torch.cat(flat)).all()) for flat in groups.values())


def _fold_of(trainer, me) -> Optional[int]:
    for cb in trainer.callbacks:
        if cb is not me and isinstance(getattr(cb, "fold", None), int):
            return cb.fold
    return None


class NonfiniteSnapshot(Callback):
    """Keep the state before the first optimizer step whose loss, gradient or parameters went non-finite.

    At every ``on_train_batch_start`` it copies the LightningModule's ``state_dict`` and the batch
    (cheap here: the S6Regressor of the book has ~30k parameters). It checks:

    - the loss: ``pl_module.last_step_record["raw_loss"]`` when the module keeps one (``prot_lib``'s
      module: the loss before any sanitisation), else the loss Lightning back-propagates;
    - the gradients before clipping (``on_before_optimizer_step``; float64-safe, so a float32 overflow
      of the norm alone does not count: :mod:`prot_lib.diagnostics.grads`);
    - every parameter after the optimizer step (``on_train_batch_end``).

    At the first failing step it stores :attr:`snapshot` and stops copying. Steps where no optimizer
    step happened are ignored.

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
        track(pl_module)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.snapshot is not None:
            return
        self._pending = {
            "step": int(trainer.global_step),
            "epoch": int(trainer.current_epoch),
            "state_dict": {k: v.detach().clone() for k, v in pl_module.state_dict().items()},
            "batch": clone_batch(batch),
            "loss_finite": True, "grad_finite": True,
        }

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        if self._pending is not None:
            self._pending["loss_finite"] &= bool(torch.isfinite(loss.detach()).all())

    def on_after_backward(self, trainer, pl_module) -> None:
        forget(pl_module)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self._pending is not None:
            self._pending["grad_finite"] = pre_clip_grad_norms(pl_module).finite()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        forget(pl_module)
        pending = self._pending
        if self.snapshot is not None or pending is None or trainer.global_step == pending["step"]:
            return
        record = dict(getattr(pl_module, "last_step_record", {}) or {})
        reasons = []
        loss_ok = math.isfinite(record["raw_loss"]) if "raw_loss" in record else pending.pop("loss_finite")
        if not loss_ok:
            reasons.append("loss")
        if not pending.pop("grad_finite"):
            reasons.append("grad")
        pending.pop("loss_finite", None)
        if not params_all_finite(pl_module):
            reasons.append("params")
        if reasons:
            self.snapshot = dict(fold=_fold_of(trainer, self), record=record, reasons=reasons, **pending)
            self._pending = None


class ScaleRecorder(Callback):
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

    def _hook(self, trainer, name: str, sub: torch.nn.Module) -> Callable:
        def hook(module, args, output) -> None:
            if not module.training or module is not sub:  # a copy of the model (a replay) is not recorded
                return
            m, bad, _ = tensor_stats([output] if isinstance(output, torch.Tensor) else [])
            self.rows.append({"fold": self._fold, "epoch": int(trainer.current_epoch),
                              "step": int(trainer.global_step), "module": name, "max_abs": m, "nonfinite": bad})
        return hook

    def on_fit_start(self, trainer, pl_module) -> None:
        self._fold = _fold_of(trainer, self)
        for name in self.names:
            sub = pl_module.get_submodule(name)
            self._handles.append(sub.register_forward_hook(self._hook(trainer, name, sub)))

    def on_fit_end(self, trainer, pl_module) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
