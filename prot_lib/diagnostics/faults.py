"""Fault injection: put an inf or NaN into a weight, a gradient or the optimizer's state at a chosen step.

Guards are only as good as the failures they were tried on. :class:`InjectFault` is a Lightning
callback (either namespace) that plants one non-finite value at one optimizer step, so that
:class:`prot_lib.callbacks.FiniteCheckpoint` (``tests/test_checkpoint.py``, 50+ trials),
:class:`prot_lib.callbacks.NonFiniteGuard` and the autopsy can be tested on failures whose place and
time are known exactly.

Targets (``step`` is Lightning's ``global_step`` of the step hit, counted from 0 within a fold):

- ``"weight"``: ``param[index] = value`` in ``on_train_batch_start`` of step ``step``: that step's
  forward runs on the poisoned weight (the autopsy must name the module that owns it);
- ``"weight_after"``: the same, in ``on_train_batch_end`` of step ``step``, after its optimizer step
  and before any checkpoint callback saves (Lightning runs ``ModelCheckpoint`` last);
- ``"grad"``: ``param.grad[index] = value`` in ``on_before_optimizer_step`` of step ``step`` (after
  backward, before clipping and the optimizer; list it before the guard among the callbacks, so the
  guard's fused check sees it);
- ``"optimizer_state"``: Adam's ``exp_avg_sq[index] = value`` for that parameter in
  ``on_train_batch_end`` of step ``step`` (the weights stay finite; only a checkpoint would carry it).
"""
from __future__ import annotations

from typing import Optional

import torch

from ..compat import Callback

TARGETS = ("weight", "weight_after", "grad", "optimizer_state")


class InjectFault(Callback):
    """Plant ``value`` at flat ``index`` of parameter ``param`` (or its gradient / Adam state) at ``step``.

    Args:
        step: the optimizer step to hit (``trainer.global_step`` before that step).
        target: one of :data:`TARGETS`.
        param: qualified parameter name in the LightningModule (``model.head.weight``); default the
            first parameter.
        value: ``float("nan")`` (default), ``float("inf")`` or ``-inf`` (any float works).
        index: flat element index, taken modulo the tensor's size.

    Attributes:
        fired: True once the fault has been planted (False if the run ended before ``step``).

    Raises:
        ValueError: unknown ``target``; KeyError (at fit start): no parameter named ``param``.
    """

    def __init__(self, step: int, target: str = "grad", param: Optional[str] = None,
                 value: float = float("nan"), index: int = 0):
        if target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
        self.step, self.target, self.param_name, self.value, self.index = int(step), target, param, float(value), int(index)
        self.fired = False
        self._step_before = -1

    def _param(self, pl_module) -> torch.nn.Parameter:
        params = dict(pl_module.named_parameters())
        name = self.param_name or next(iter(params))
        if name not in params:
            raise KeyError(f"no parameter {name!r}; e.g. {', '.join(list(params)[:4])}")
        return params[name]

    def _plant(self, t: torch.Tensor) -> None:
        with torch.no_grad():
            t.view(-1)[self.index % t.numel()] = self.value
        self.fired = True

    def on_fit_start(self, trainer, pl_module) -> None:
        self._param(pl_module)  # fail early on a bad name

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._step_before = int(trainer.global_step)
        if self.target == "weight" and not self.fired and self._step_before == self.step:
            self._plant(self._param(pl_module).data)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self.target == "grad" and not self.fired and int(trainer.global_step) == self.step:
            p = self._param(pl_module)
            if p.grad is not None:
                self._plant(p.grad)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.fired or self._step_before != self.step:
            return
        p = self._param(pl_module)
        if self.target == "weight_after":
            self._plant(p.data)
        elif self.target == "optimizer_state":
            for opt in trainer.optimizers:
                state = opt.state.get(p, {})
                if "exp_avg_sq" in state:
                    self._plant(state["exp_avg_sq"])
