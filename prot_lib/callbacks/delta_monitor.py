"""Mamba's step size delta during training, per block: :class:`DeltaMonitor`.

Every selective-SSM block (mamba-ssm's ``Mamba``, mirrored by :class:`prot_lib.models.Mamba`) computes

    delta = softplus(dt_proj.weight @ x_proj(x)[..., :dt_rank] + dt_proj.bias)     (batch, L, d_inner)

(Gu and Dao 2023, Algorithm 2, s_Delta = Broadcast_D(Linear_1(x)), tau_Delta = softplus; mamba-ssm adds
the bias inside the scan, ``selective_scan_fn(..., delta_bias=dt_proj.bias, delta_softplus=True)``). The
discretised decay is A_bar = exp(delta * A) and the input enters the state as delta * B * u, so a delta
that drifts up means a state that forgets faster but takes in more of each token. At initialisation
softplus(dt_proj.bias) is log-uniform in [dt_min, dt_max] = [0.001, 0.1]; training moves the bias (the
"delta bias") and the input-dependent part.

How it is measured, cheaply: on a step it logs (``global_step % every_n_steps == 0``) the callback
registers a forward hook on each block's ``x_proj`` in ``on_train_batch_start`` and removes it after
that step's forward; the hook reads the first ``max_samples`` rows of ``x_proj``'s output and computes
delta from them without gradient. On the other steps no hook is registered and nothing is computed.
The ``x_proj`` output is the exact tensor the block feeds its ``dt_proj.weight`` product (our block and
mamba-ssm's ``mamba_inner_fn`` both split it as ``[dt_rank, d_state, d_state]``), so the logged delta is
the one the scan uses, in float32, up to round-off of the matmul.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from ..compat import Callback
from ..models.mamba import Mamba

#: the numbers logged per block, as ``<stat>/<block name>``: delta's median and max, the delta bias's median
#: and max, the smallest |A| = exp(A_log) (trained: it need not stay at init's 1), and the largest decay
#: exponent delta * |A| over the measured rows, tokens, channels and states (the smallest decay is
#: A_bar = exp(-decay_exponent_max); float32's exp underflows to 0 above about 104)
STATS = ("delta_median", "delta_max", "delta_bias_median", "delta_bias_max", "A_abs_min", "decay_exponent_max")


def block_delta(block: Mamba, x_dbl: torch.Tensor) -> torch.Tensor:
    """delta of ``block`` from its ``x_proj`` output.

    Args:
        block: a :class:`prot_lib.models.Mamba`.
        x_dbl: ``x_proj``'s output, (batch, L, dt_rank + 2 * d_state).

    Returns:
        delta = softplus(x_dbl[..., :dt_rank] @ dt_proj.weight.T + dt_proj.bias): (batch, L, d_inner)
        float32, a step size (dimensionless; A_bar = exp(delta * A)).
    """
    dt = x_dbl[..., :block.dt_rank].float()
    return F.softplus(F.linear(dt, block.dt_proj.weight.float(), block.dt_proj.bias.float()))


class DeltaMonitor(Callback):
    """Log per Mamba block the median and max of delta and of the delta bias softplus(dt_proj.bias), the
    smallest |A| and the largest decay exponent delta * |A|, every ``every_n_steps`` optimizer steps.

    Args:
        every_n_steps: log on steps with ``global_step % every_n_steps == 0`` (the forward of that step,
            before its optimizer update; step 0 is the initialisation; with gradient accumulation, the
            step's first batch).
        max_samples: rows of the training batch measured (the first ones), to bound the cost.
        log: log through ``pl_module.log_dict`` (``on_step=True``), as ``delta_median/<block>``,
            ``delta_max/<block>``, ... one per :data:`STATS` (``<block>``: the block's qualified module
            name); off: only keep :attr:`records`.

    Attributes:
        records: one dict per (logged step, block): ``step``, ``block``, and the :data:`STATS`
            (floats; NaN when the block's delta is non-finite: median and max propagate NaN). Read it
            as a table with :meth:`frame`.
        n_measured: forward passes measured (hook calls), to check that off-steps cost nothing.

    Raises:
        ValueError: ``every_n_steps`` or ``max_samples`` below 1.
        RuntimeError (at ``on_fit_start``): the module holds no :class:`prot_lib.models.Mamba` block.

    Works with any LightningModule holding :class:`prot_lib.models.Mamba` blocks, under
    ``lightning.pytorch`` and ``pytorch_lightning``.

    Example::

        monitor = DeltaMonitor(every_n_steps=10)
        trainer = Trainer(callbacks=[monitor]); trainer.fit(module, loader)
        monitor.frame()   # step, block, delta_median, delta_max, ..., A_abs_min, decay_exponent_max
    """

    def __init__(self, every_n_steps: int = 10, max_samples: int = 8, log: bool = True) -> None:
        if every_n_steps < 1 or max_samples < 1:
            raise ValueError(f"every_n_steps and max_samples must be >= 1, got {every_n_steps}, {max_samples}")
        self.every_n_steps, self.max_samples, self._log = int(every_n_steps), int(max_samples), log
        self.records: List[Dict[str, object]] = []
        self.n_measured = 0
        self._blocks: Dict[str, Mamba] = {}
        self._handles: list = []
        self._pending: List[Dict[str, object]] = []
        self._step, self._last_step = 0, -1

    # ------------------------------------------------------------------ hooks
    def _hook(self, name: str, block: Mamba):
        def hook(mod: nn.Module, inputs, output: torch.Tensor) -> None:
            with torch.no_grad():
                delta = block_delta(block, output.detach()[: self.max_samples])
                bias = F.softplus(block.dt_proj.bias.detach().float())
                a_abs = block.A_log.detach().float().exp()                      # |A|, (d_inner, d_state)
                # max over (row, t) first: delta * |A| is monotone in delta for each (channel, state)
                expo = delta.flatten(0, -2).amax(0)[:, None] * a_abs
                self._pending.append({"step": self._step, "block": name,
                                      "delta_median": delta.median(), "delta_max": delta.amax(),
                                      "delta_bias_median": bias.median(), "delta_bias_max": bias.amax(),
                                      "A_abs_min": a_abs.amin(), "decay_exponent_max": expo.amax()})
            self.n_measured += 1
        return hook

    def _remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    # ------------------------------------------------------------------ Lightning hooks
    def on_fit_start(self, trainer, pl_module) -> None:
        self._last_step = -1
        self._blocks = {name: m for name, m in pl_module.named_modules() if isinstance(m, Mamba)}
        if not self._blocks:
            raise RuntimeError(f"DeltaMonitor: {type(pl_module).__name__} holds no prot_lib.models.Mamba block")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._remove()  # a forward that raised last step may have left them
        self._pending = []
        step = int(trainer.global_step)
        # with gradient accumulation several batches share a step: measure its first batch only
        if step % self.every_n_steps or step == self._last_step:
            return
        self._step = self._last_step = step
        self._handles = [b.x_proj.register_forward_hook(self._hook(name, b)) for name, b in self._blocks.items()]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._remove()
        if not self._pending:
            return
        rows = [{k: (float(v) if torch.is_tensor(v) else v) for k, v in r.items()} for r in self._pending]
        self._pending = []
        self.records.extend(rows)
        if self._log:
            pl_module.log_dict({f"{stat}/{r['block']}": r[stat] for r in rows for stat in STATS},
                               on_step=True, on_epoch=False)

    def on_fit_end(self, trainer, pl_module) -> None:
        self._remove()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._remove()

    # ------------------------------------------------------------------ reading
    def frame(self, block: Optional[str] = None) -> pd.DataFrame:
        """:attr:`records` as a table (columns ``step``, ``block``, :data:`STATS`), one block or all."""
        df = pd.DataFrame(self.records, columns=["step", "block", *STATS])
        return df if block is None else df[df["block"] == block].reset_index(drop=True)
