"""What a training step with a non-finite loss or gradient does: ``training.on_nonfinite``.

=============  ==================================================================================
policy         on a non-finite step
=============  ==================================================================================
``continue``   nothing: the optimizer steps with the non-finite gradients (the write-up's
               behaviour, kept bit for bit because the book's reproductions show its outcome).
               No guard object exists.
``stop``       replay the step (:func:`~prot_lib.diagnostics.autopsy.autopsy`), write a repro bundle
               ``<run_dir>/fold<k>/nonfinite_step<step>.pt``, raise
               :class:`~prot_lib.diagnostics.autopsy.NonFiniteTrainingError` carrying the report.
``skip``       drop the step's update (every ``p.grad = None``: torch optimizers skip parameters
               without a gradient, so neither the weights nor Adam's moments move), as AMP's
               ``GradScaler`` skips ``optimizer.step`` on inf; raise after
               ``training.max_consecutive_skips`` non-finite steps in a row.
``rollback``   restore the last good weights and optimizer state, multiply every param group's lr
               (and the schedulers' ``base_lrs``) by ``training.rollback_lr_factor``, drop the step;
               raise after ``max_consecutive_skips`` in a row. PaLM (Chowdhery et al. 2022, sec. 5.1)
               restarts "from a checkpoint roughly 100 steps before the spike" and skips the batches
               around it; here the last good copy is refreshed every ``training.rollback_every``
               finite steps.
=============  ==================================================================================

The check is fused into what every step computes anyway: ``NaNStudyModule.configure_gradient_clipping``
(the hook Lightning calls after backward, right before ``optimizer.step``) measures the total gradient
L2 norm before clipping and already holds the loss as a Python float, so a finite step costs two
``math.isfinite`` calls on floats. Only a non-finite step pays for a copy of the weights and a replay.

"Last good" state (rollback): the weights and optimizer state a *finite* step started from, copied in
``check`` before that step's update. The copy is the state whose forward and backward were just
seen finite, so it is verified good, not merely the latest. Restoring it undoes the update of the
step it was taken at as well: with ``rollback_every: 1`` a non-finite step t rolls back to the state
before step t-1, i.e. the batches t-1 and t are skipped (the update at t-1 is the one that produced
weights which blew up at t).

Under ``skip`` and ``rollback`` the weights stay finite, so later epochs are validated as usual;
:func:`early_stopping` adds Lightning's ``EarlyStopping(check_finite=True)`` on ``val_loss`` as the
backstop for what this guard cannot see (a validation batch that overflows).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict, List, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import EarlyStopping

from ..training.config import TrainingConfig
from .autopsy import AutopsyReport, NonFiniteTrainingError, autopsy, bundle_path, save_bundle

POLICIES = ("continue", "stop", "skip", "rollback")
#: what ``check`` returns, and what the history's ``action`` column holds
ACTIONS = ("step", "skip", "rollback")


def _clone_batch(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, (list, tuple)):
        return type(obj)(_clone_batch(o) for o in obj)
    if isinstance(obj, dict):
        return {k: _clone_batch(v) for k, v in obj.items()}
    return obj


def _schedulers(trainer: Optional[pl.Trainer]) -> List[Any]:
    """Every LR scheduler of the run, SequentialLR's children included."""
    out: List[Any] = []
    for cfg in getattr(trainer, "lr_scheduler_configs", None) or []:
        stack = [cfg.scheduler]
        while stack:
            s = stack.pop()
            out.append(s)
            stack.extend(getattr(s, "_schedulers", []))
    return out


class NonFiniteGuard:
    """The per-fold state of ``training.on_nonfinite`` (``stop``, ``skip`` or ``rollback``).

    Made by :func:`make_guard`; owned by ``NaNStudyModule`` (``module.guard``), which calls
    :meth:`check` from ``configure_gradient_clipping`` once per optimizer step, after backward and
    before clipping and ``optimizer.step``.

    Args:
        training: the run's ``training`` config (policy, max_consecutive_skips, rollback_every,
            rollback_lr_factor).

    Attributes:
        n_skipped, n_rollbacks: steps dropped by ``skip`` / rolled back by ``rollback`` in this fold.
        consecutive: non-finite steps in a row, up to the current one.
        first_report: :class:`AutopsyReport` of the fold's first non-finite step (None until then).
        bundles: paths of the repro bundles written (the first non-finite step, and the step a
            ``stop`` or an abort happened at), in ``module.bundle_dir`` (``train_fold`` sets
            ``<run_dir>/fold<k>``; when None, the Trainer's ``log_dir`` or ``default_root_dir``).
    """

    def __init__(self, training: TrainingConfig):
        if training.on_nonfinite not in POLICIES[1:]:
            raise ValueError(f"NonFiniteGuard needs on_nonfinite in {POLICIES[1:]}, got {training.on_nonfinite!r}")
        self.policy = training.on_nonfinite
        self.max_consecutive = training.max_consecutive_skips
        self.rollback_every = training.rollback_every
        self.lr_factor = training.rollback_lr_factor
        self.n_skipped = 0
        self.n_rollbacks = 0
        self.consecutive = 0
        self.first_report: Optional[AutopsyReport] = None
        self.bundles: List[Path] = []
        self._streak: Optional[Dict[str, Any]] = None  # snapshot + report of the streak's first step
        self._good: Optional[Dict[str, Any]] = None    # rollback: last good weights + optimizer state

    # ------------------------------------------------------------------ the per-step check
    def check(self, module: pl.LightningModule, optimizer: torch.optim.Optimizer, grad_norm: float) -> str:
        """Decide what this optimizer step does. Called with gradients computed, before clipping.

        Args:
            module: the ``NaNStudyModule``; reads ``last_step_record["raw_loss"/"train_loss"]`` (floats),
                ``last_batch`` (the step's batch), ``fold``, ``bundle_dir``, ``trainer.global_step``.
            optimizer: the step's optimizer (its state is copied and restored under ``rollback``).
            grad_norm: total gradient L2 norm before clipping (float; inf/NaN when any gradient is).

        Returns:
            ``"step"`` (finite: clip and step as usual), ``"skip"`` or ``"rollback"`` (every
            ``p.grad`` is None now, so ``optimizer.step`` changes nothing).

        Raises:
            NonFiniteTrainingError: policy ``stop`` on a non-finite step, or ``skip``/``rollback``
                after ``max_consecutive_skips`` non-finite steps in a row.
        """
        rec = module.last_step_record
        loss_ok = math.isfinite(rec.get("raw_loss", 0.0)) and math.isfinite(rec.get("train_loss", 0.0))
        grad_ok = math.isfinite(grad_norm)
        step = int(module.trainer.global_step) if module._trainer is not None else 0
        if loss_ok and grad_ok:
            self.consecutive = 0
            self._streak = None
            if self.policy == "rollback" and (self._good is None or step - self._good["step"] >= self.rollback_every):
                self._keep_good(module, optimizer, step)
            return "step"

        reasons = [r for r, ok in (("loss", loss_ok), ("grad", grad_ok)) if not ok]
        self.consecutive += 1
        if self._streak is None:  # the first failing step of a streak: keep it
            self._streak = self._take_snapshot(module, step, reasons)
            if self.first_report is None:  # the fold's first: replay it and write its bundle now
                self.first_report = self._replay(module, self._streak)
        if self.policy == "stop":
            self._raise(module, "non-finite training step (on_nonfinite: stop)")
        if self.consecutive >= self.max_consecutive:
            self._raise(module, f"{self.consecutive} non-finite steps in a row (on_nonfinite: {self.policy}, "
                                f"max_consecutive_skips: {self.max_consecutive}); autopsy of the first of them")
        action = "skip"
        if self.policy == "rollback":
            self._roll_back(module, optimizer)
            action = "rollback"
            self.n_rollbacks += 1
        else:
            self.n_skipped += 1
        for p in module.parameters():
            p.grad = None
        return action

    # ------------------------------------------------------------------ helpers
    def _take_snapshot(self, module, step: int, reasons: List[str]) -> Dict[str, Any]:
        """The weights the step started from (the optimizer has not stepped yet) and its batch."""
        trainer = module._trainer
        fold = getattr(module, "fold", None)
        return {
            "fold": fold, "step": step, "epoch": int(trainer.current_epoch) if trainer is not None else None,
            "seed": module.config.training.seed + (fold or 0), "reasons": reasons,
            "record": dict(module.last_step_record),
            "state_dict": {k: v.detach().clone() for k, v in module.state_dict().items()},
            "batch": _clone_batch(module.last_batch),
        }

    def _replay(self, module, snap: Dict[str, Any]) -> AutopsyReport:
        """Autopsy of a kept snapshot and its repro bundle (once per snapshot)."""
        if "report" not in snap:
            trainer = module._trainer
            fold_dir = getattr(module, "bundle_dir", None)
            if fold_dir is None:
                fold_dir = Path(trainer.log_dir or trainer.default_root_dir) if trainer is not None else Path(".")
            snap["report"] = autopsy(snap, module.config)
            snap["bundle"] = save_bundle(bundle_path(fold_dir, snap["step"]), snap, module.config)
            self.bundles.append(snap["bundle"])
        return snap["report"]

    def _raise(self, module, why: str) -> None:
        s = self._streak
        report = self._replay(module, s)
        msg = (f"{why}\n{report}\nrepro bundle: {s['bundle']}\n"
               f"replay it with: python -m prot_lib autopsy {s['bundle']}")
        raise NonFiniteTrainingError(msg, report=report, bundle_path=s["bundle"], fold=s["fold"], step=s["step"])

    def _keep_good(self, module, optimizer, step: int) -> None:
        self._good = {
            "step": step,
            "model": {k: v.detach().clone() for k, v in module.state_dict().items()},
            # keyed by parameter object: the model is restored in place, so the keys stay valid
            "optimizer": {p: {k: (v.clone() if torch.is_tensor(v) else v) for k, v in st.items()}
                          for p, st in optimizer.state.items()},
        }

    def _roll_back(self, module, optimizer) -> None:
        good = self._good
        if good is not None:
            module.load_state_dict(good["model"])  # copies into the same tensors (optimizer keeps them)
            for p in list(optimizer.state):
                if p not in good["optimizer"]:
                    del optimizer.state[p]
            for p, st in good["optimizer"].items():
                optimizer.state[p] = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in st.items()}
        # lr cut: the param groups and every scheduler's base_lrs (closed-form schedulers, e.g. StepLR
        # after SequentialLR's milestone, recompute lr from base_lrs and would undo a group-only cut)
        for g in optimizer.param_groups:
            g["lr"] *= self.lr_factor
            if "initial_lr" in g:
                g["initial_lr"] *= self.lr_factor
        for s in _schedulers(module._trainer):
            if hasattr(s, "base_lrs"):
                s.base_lrs = [b * self.lr_factor for b in s.base_lrs]


def make_guard(training: TrainingConfig) -> Optional[NonFiniteGuard]:
    """The guard of ``training.on_nonfinite``; None for ``continue`` (nothing checks, nothing changes)."""
    return None if training.on_nonfinite == "continue" else NonFiniteGuard(training)


def early_stopping(training: TrainingConfig) -> List[pl.Callback]:
    """``[EarlyStopping(monitor="val_loss", check_finite=True)]`` under ``skip``/``rollback``, else ``[]``.

    It only ends a fold whose validation loss is non-finite (patience is effectively infinite): the
    guard keeps the weights finite, so this catches what it cannot see, e.g. a validation batch that
    overflows. Not used under ``continue`` (the write-up trained on) nor ``stop`` (which raises first).
    """
    if training.on_nonfinite not in ("skip", "rollback"):
        return []
    return [EarlyStopping(monitor="val_loss", mode="min", check_finite=True, patience=10 ** 9, strict=False,
                          verbose=False)]
