"""Gradient norms before and after clipping, for any LightningModule: :class:`GradNormMonitor`.

Where the two numbers come from (Lightning 2.6, automatic optimization,
``lightning/pytorch/plugins/precision/precision.py: Precision._after_closure``): after backward,
Lightning calls every callback's ``on_before_optimizer_step``, then the module's, then
``configure_gradient_clipping`` (``Trainer(gradient_clip_val=...)``), then the optimizer's update.
So:

- ``grad_norm_before_clip`` is measured in ``on_before_optimizer_step``, shared with the other
  callbacks of :mod:`prot_lib.callbacks` through :func:`prot_lib.diagnostics.grads.pre_clip_grad_norms`:
  the first of them to run fixes the numbers before any of them (or Lightning) clips;
- ``grad_norm_after_clip`` is measured in ``on_train_batch_end``, after the update: the gradients the
  optimizer used (Lightning zeroes them only in the next step's closure). 0 when
  :class:`~prot_lib.callbacks.NonFiniteGuard` dropped the step (no gradient left).

Both are L2 norms of all gradients as one vector, summed in float64 so a float32 overflow of the
squares (norms above ~1.8e19) does not read as ``inf``. With ``per_parameter=True`` each parameter's
norm is logged too, as ``grad_norm_before_clip/<name>`` and ``grad_norm_after_clip/<name>``.
"""
from __future__ import annotations

import math
from typing import Dict, Optional

from ..compat import Callback
from ..diagnostics.grads import GradNorms, forget, grad_norms, pre_clip_grad_norms, track

BEFORE, AFTER = "grad_norm_before_clip", "grad_norm_after_clip"


class GradNormMonitor(Callback):
    """Log the total (and optionally per-parameter) gradient L2 norm before and after clipping.

    Args:
        per_parameter: also measure each parameter's gradient norm (one more host sync per step,
            and two logged metrics per parameter).
        log: log through ``pl_module.log`` (``on_step=True``); off: only keep :attr:`last`.

    Attributes:
        last: the latest optimizer step's numbers: ``grad_norm_before_clip``, ``grad_norm_after_clip``
            (floats), and with ``per_parameter`` ``before`` and ``after`` (``{name: norm}``; a
            parameter without gradient after the step is missing from ``after``); ``step``: the
            ``global_step`` before that step. Empty until the first step.

    Works with any LightningModule using automatic optimization, under ``lightning.pytorch`` and
    ``pytorch_lightning``, with or without ``Trainer(gradient_clip_val=...)``.

    Example::

        trainer = Trainer(gradient_clip_val=1.0, callbacks=[GradNormMonitor(per_parameter=True)])
    """

    def __init__(self, per_parameter: bool = False, log: bool = True) -> None:
        self.per_parameter = per_parameter
        self._log = log
        self.last: Dict[str, object] = {}
        self._pending: Optional[GradNorms] = None
        self._step = 0

    def on_fit_start(self, trainer, pl_module) -> None:
        track(pl_module, per_tensor=self.per_parameter)

    def on_after_backward(self, trainer, pl_module) -> None:
        forget(pl_module)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self._pending = pre_clip_grad_norms(pl_module)
        self._step = int(trainer.global_step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        before = self._pending
        if before is None:  # no optimizer step in this batch (gradient accumulation)
            return
        self._pending = None
        forget(pl_module)
        after = grad_norms(pl_module.named_parameters())
        last: Dict[str, object] = {"step": self._step, BEFORE: before.total_value(),
                                   AFTER: after.total_value() if after.names else 0.0}
        if self.per_parameter:
            last["before"], last["after"] = before.as_dict(), after.as_dict()
        self.last = last
        if self._log:
            metrics = {BEFORE: last[BEFORE], AFTER: last[AFTER]}
            if self.per_parameter:
                metrics.update({f"{BEFORE}/{k}": v for k, v in last["before"].items()})
                metrics.update({f"{AFTER}/{k}": last["after"].get(k, math.nan) for k in last["before"]})
            pl_module.log_dict(metrics, on_step=True, on_epoch=False)
