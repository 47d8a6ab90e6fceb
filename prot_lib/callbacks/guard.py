"""What a training step with a non-finite loss or gradient does: :class:`NonFiniteGuard`.

=============  ==================================================================================
policy         on a non-finite step
=============  ==================================================================================
``stop``       replay the step (:func:`prot_lib.diagnostics.autopsy`), write a repro bundle
               ``<bundle_dir>/nonfinite_step<step>.pt``, raise
               :class:`~prot_lib.diagnostics.autopsy.NonFiniteTrainingError` carrying the report.
``skip``       drop the step's update (every ``p.grad = None``: torch optimizers skip parameters
               without a gradient, so neither the weights nor Adam's moments and step counts move),
               as AMP's ``GradScaler`` skips ``optimizer.step`` on inf; raise after
               ``max_consecutive`` non-finite steps in a row.
``rollback``   restore the last good weights and optimizer state, multiply every param group's lr
               (and the schedulers' ``base_lrs``) by ``lr_factor``, drop the step; raise after
               ``max_consecutive`` in a row. PaLM (Chowdhery et al. 2022, sec. 5.1) restarts "from a
               checkpoint roughly 100 steps before the spike" and skips the batches around it; here
               the last good copy is refreshed every ``rollback_every`` finite steps.
=============  ==================================================================================

(``prot_lib``'s config key ``training.on_nonfinite`` adds ``continue``, the write-up's behaviour: no
guard at all; :mod:`prot_lib.training.safety_nets` translates the keys.)

**Where it looks, and what it costs.** Lightning (2.6, automatic optimization) runs, per optimizer
step: ``training_step``, ``on_before_backward(loss)``, backward, ``on_after_backward``, then
``on_before_optimizer_step`` of every callback and of the module, then ``configure_gradient_clipping``
(``Trainer(gradient_clip_val=...)``), then the optimizer's update
(``lightning/pytorch/loops/optimization/automatic.py: Closure.closure``,
``plugins/precision/precision.py: Precision._after_closure``). The guard keeps a reference to the loss
in ``on_before_backward`` and decides in ``on_before_optimizer_step``: before Lightning clips, so it
sees the pre-clip gradients, and before the update, so it can still drop it. The check is one fused
reduction: the total gradient norm (accumulated in float64: :mod:`prot_lib.diagnostics.grads`; shared
with :class:`~prot_lib.callbacks.GradNormMonitor` and :class:`~prot_lib.callbacks.AdaptiveGradientClipping`)
and the loss, each read once as a Python float (``math.isfinite``). A float32 overflow of the norm
alone (finite gradients, norm above ~1.8e19) is not a non-finite step. Only a non-finite step pays for a copy of the model and a
replay. ``benchmarks/bench_guards.py`` measures the cost.

**"Last good" state (rollback)**: the weights and optimizer state a *finite* step started from, copied
before that step's update. The copy is the state whose forward and backward were just seen finite, so
it is verified good, not merely the latest. Restoring it undoes the update of the step it was taken
at as well: with ``rollback_every=1`` a non-finite step t rolls back to the state before step t-1,
i.e. the batches t-1 and t are skipped (the update at t-1 is the one that produced weights which blew
up at t).

Gradient accumulation: the losses of every micro-batch of the step are checked; the autopsy replays
the last micro-batch.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Union

import torch

from ..compat import Callback
from ..diagnostics.autopsy import (AutopsyReport, NonFiniteTrainingError, autopsy, bundle_path, capture_step,
                                   save_bundle)
from ..diagnostics.grads import forget, pre_clip_grad_norms, track

POLICIES = ("stop", "skip", "rollback")
#: what the guard made of a step (:attr:`NonFiniteGuard.last_action`)
ACTIONS = ("step", "skip", "rollback")


def _schedulers(trainer) -> List[Any]:
    """Every LR scheduler of the run, SequentialLR's children included."""
    out: List[Any] = []
    for cfg in getattr(trainer, "lr_scheduler_configs", None) or []:
        stack = [cfg.scheduler]
        while stack:
            s = stack.pop()
            out.append(s)
            stack.extend(getattr(s, "_schedulers", []))
    return out


class NonFiniteGuard(Callback):
    """Stop, skip or roll back a training step whose loss or gradient is non-finite, with an autopsy.

    For any LightningModule with automatic optimization and any Trainer (``gradient_clip_val`` included),
    under ``lightning.pytorch`` or ``pytorch_lightning``.

    Args:
        policy: ``"stop"``, ``"skip"`` or ``"rollback"`` (module docstring).
        autopsy: on the first non-finite step of a streak, replay it (:func:`prot_lib.diagnostics.autopsy`)
            and write its repro bundle; off: no replay, no file (the error has no report).
        bundle_dir: folder for ``nonfinite_step<step>.pt`` (default: the Trainer's ``log_dir``, else its
            ``default_root_dir``).
        max_consecutive: skip/rollback give up (raise) at this many non-finite steps in a row.
        rollback_every: rollback keeps a last-good copy every N finite optimizer steps.
        lr_factor: rollback multiplies the learning rate by this, per rollback, in (0, 1].
        replay_loss: ``replay_loss(module, batch) -> scalar`` the autopsy replays (default: the module's
            own ``training_step``); give the loss before any sanitisation if the module sanitises.
        trace_root: the submodule whose modules the report names (default: the whole module).
        meta: kept in the report and the bundle (``fold``, ``seed``, ...).

    Attributes:
        n_skipped, n_rollbacks: steps dropped by ``skip`` / rolled back by ``rollback``.
        consecutive: non-finite steps in a row, up to the current one.
        last_action: what the latest optimizer step was: one of :data:`ACTIONS`.
        first_step, first_report, first_bundle: the first non-finite step seen, its
            :class:`~prot_lib.diagnostics.AutopsyReport` and bundle path (None until then, or with
            ``autopsy=False``).
        bundles: every bundle written (the first non-finite step of each streak that raised, and the
            run's first), in order.

    Raises (from ``trainer.fit``):
        NonFiniteTrainingError: ``stop`` at the first non-finite step; ``skip``/``rollback`` at
            ``max_consecutive`` in a row. ``err.report`` is the autopsy of the streak's first step.
        ValueError (at construction): unknown policy or an argument out of range.

    Example::

        trainer = Trainer(gradient_clip_val=1.0, callbacks=[NonFiniteGuard("rollback")])
    """

    def __init__(self, policy: str = "stop", autopsy: bool = True, bundle_dir: Union[str, Path, None] = None,
                 max_consecutive: int = 10, rollback_every: int = 1, lr_factor: float = 0.5,
                 replay_loss: Optional[Callable[[Any, Any], torch.Tensor]] = None, trace_root: Optional[str] = None,
                 meta: Optional[Dict[str, Any]] = None) -> None:
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
        if max_consecutive < 1:
            raise ValueError(f"max_consecutive must be >= 1, got {max_consecutive}")
        if rollback_every < 1:
            raise ValueError(f"rollback_every must be >= 1, got {rollback_every}")
        if not 0.0 < lr_factor <= 1.0:
            raise ValueError(f"lr_factor must be in (0, 1], got {lr_factor}")
        self.policy, self.autopsy = policy, autopsy
        self.bundle_dir = None if bundle_dir is None else Path(bundle_dir)
        self.max_consecutive, self.rollback_every, self.lr_factor = max_consecutive, rollback_every, lr_factor
        self.replay_loss, self.trace_root, self.meta = replay_loss, trace_root, dict(meta or {})
        self.n_skipped = self.n_rollbacks = self.consecutive = 0
        self.last_action = "step"
        self.first_step: Optional[int] = None
        self.first_report: Optional[AutopsyReport] = None
        self.first_bundle: Optional[Path] = None
        self.bundles: List[Path] = []
        self._batch: Any = None
        self._losses: List[torch.Tensor] = []
        self._streak: Optional[Dict[str, Any]] = None  # the streak's first non-finite step
        self._good: Dict[int, Dict[str, Any]] = {}      # rollback: id(optimizer) -> last good state

    # ------------------------------------------------------------------ Lightning hooks
    def on_fit_start(self, trainer, pl_module) -> None:
        track(pl_module)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._batch = batch  # a reference: copied only if the step goes non-finite

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        self._losses.append(loss.detach())

    def on_after_backward(self, trainer, pl_module) -> None:
        forget(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        forget(pl_module)  # let the gradients go with the next zero_grad, as without the guard

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        losses, self._losses = self._losses, []
        norms = pre_clip_grad_norms(pl_module)
        # one reduction (the float64 total gradient norm, shared) and one read of it and of the loss
        grad_ok = math.isfinite(norms.total_value())
        loss_ok = all(math.isfinite(float(loss)) for loss in losses)  # 0-dim: Lightning requires a scalar
        if grad_ok and loss_ok:
            return self._finite_step(trainer, pl_module, optimizer)
        reasons = [r for r, ok in (("loss", loss_ok), ("grad", grad_ok)) if not ok]
        self._nonfinite_step(trainer, pl_module, optimizer, reasons)

    # ------------------------------------------------------------------ decisions
    def _finite_step(self, trainer, pl_module, optimizer) -> None:
        self.consecutive = 0
        self._streak = None
        self.last_action = "step"
        if self.policy == "rollback":
            good = self._good.get(id(optimizer))
            step = int(trainer.global_step)
            if good is None or step - good["step"] >= self.rollback_every:
                self._keep_good(pl_module, optimizer, step)

    def _nonfinite_step(self, trainer, pl_module, optimizer, reasons: List[str]) -> None:
        step = int(trainer.global_step)
        self.consecutive += 1
        if self._streak is None:  # the first failing step of a streak: keep it
            self._streak = self._snapshot(trainer, pl_module, step, reasons)
            if self.first_step is None:  # the run's first: replay it and write its bundle now
                self.first_step = step
                self._replay(trainer, self._streak)
                self.first_report, self.first_bundle = self._streak.get("report"), self._streak.get("bundle")
        if self.policy == "stop":
            self._raise(trainer, "non-finite training step (policy: stop)")
        if self.consecutive >= self.max_consecutive:
            self._raise(trainer, f"{self.consecutive} non-finite steps in a row (policy: {self.policy}, "
                                 f"max_consecutive: {self.max_consecutive}); autopsy of the first of them")
        if self.policy == "rollback":
            self._roll_back(trainer, pl_module, optimizer)
            self.n_rollbacks += 1
        else:
            self.n_skipped += 1
        self.last_action = self.policy
        for group in optimizer.param_groups:  # drop the update: optimizers skip parameters without .grad
            for p in group["params"]:
                p.grad = None
        for p in pl_module.parameters():
            p.grad = None

    # ------------------------------------------------------------------ helpers
    def _snapshot(self, trainer, pl_module, step: int, reasons: List[str]) -> Dict[str, Any]:
        meta = {**self.meta, "step": step, "epoch": int(trainer.current_epoch), "reasons": reasons}
        if not self.autopsy:
            return {"meta": meta}
        return capture_step(pl_module, self._batch, loss_fn=self.replay_loss, trace_root=self.trace_root, meta=meta)

    def _replay(self, trainer, snap: Dict[str, Any]) -> None:
        """Autopsy of a kept snapshot and its repro bundle (once per snapshot; never raises)."""
        if not self.autopsy or "report" in snap:
            return
        try:
            snap["report"] = autopsy(snap)
        except Exception as err:  # noqa: BLE001 - a failing replay must not hide the training failure
            snap["report"], snap["replay_error"] = None, f"{type(err).__name__}: {err}"
        folder = self.bundle_dir
        if folder is None:
            folder = Path(getattr(trainer, "log_dir", None) or trainer.default_root_dir)
        snap["bundle"] = save_bundle(bundle_path(folder, snap["meta"]["step"]), snap)
        self.bundles.append(snap["bundle"])

    def _raise(self, trainer, why: str) -> None:
        s = self._streak
        self._replay(trainer, s)
        report, bundle = s.get("report"), s.get("bundle")
        if report is not None:
            body = str(report)
        elif not self.autopsy:
            body = "(autopsy off: NonFiniteGuard(autopsy=False))"
        else:
            body = f"(the replay failed: {s.get('replay_error')}; pass replay_loss= to the guard)"
        msg = f"{why}\n{body}"
        if bundle is not None:
            msg += f"\nrepro bundle: {bundle}\nreplay it with: python -m prot_lib autopsy {bundle}"
        raise NonFiniteTrainingError(msg, report=report, bundle_path=bundle, fold=s["meta"].get("fold"),
                                     step=s["meta"]["step"])

    def _keep_good(self, pl_module, optimizer, step: int) -> None:
        self._good[id(optimizer)] = {
            "step": step,
            "model": {k: v.detach().clone() for k, v in pl_module.state_dict().items()},
            # keyed by parameter object: the model is restored in place, so the keys stay valid
            "optimizer": {p: {k: (v.clone() if torch.is_tensor(v) else v) for k, v in st.items()}
                          for p, st in optimizer.state.items()},
        }

    def _roll_back(self, trainer, pl_module, optimizer) -> None:
        good = self._good.get(id(optimizer))
        if good is not None:
            pl_module.load_state_dict(good["model"])  # copies into the same tensors (the optimizer keeps them)
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
        for s in _schedulers(trainer):
            if hasattr(s, "base_lrs"):
                s.base_lrs = [b * self.lr_factor for b in s.base_lrs]

    def __repr__(self) -> str:
        return (f"NonFiniteGuard(policy={self.policy!r}, skipped={self.n_skipped}, rollbacks={self.n_rollbacks}, "
                f"first_step={self.first_step})")

