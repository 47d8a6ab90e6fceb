"""Single short trainings, in this process: the clip explorer's retraining and chapter 4's Adam probe.

One fold, a few hundred optimizer steps at most, on one CPU thread: a few seconds each. The run is a
shipped reproduction (:func:`~prot_lib.training.config.reproduction_config`) with three knobs turned
(learning rate, ``gradient_clip_val`` applied by ``Trainer(gradient_clip_val=...)``, seed), built by
:func:`~prot_lib.experiments.cells.cell_config` like every sweep cell and trained by the same
:func:`~prot_lib.training.kfold.run_kfold` as every chapter, so the numbers are the chapters' numbers
(and cached with them under ``PROT_LIB_CACHE``). Sweeps of many such runs go through the engine
(:func:`prot_lib.experiments.stability.clip_sweep`).
"""
from __future__ import annotations

import contextlib
import math
import tempfile
from pathlib import Path
from typing import List, Optional, Sequence

import lightning.pytorch as pl
import numpy as np
import pandas as pd
import torch

from ..training.config import RunConfig, reproduction_config
from ..training.kfold import KFoldResult, run_kfold
from .cells import cell_config
from .runtime import quiet_lightning

__all__ = ["quick_config", "quick_train", "AdamStepRecorder", "adam_probe", "adam_toy_steps"]


def quick_config(dataset: str = "ishigami", lr: Optional[float] = None, gradient_clip_val: Optional[float] = None,
                 seed: int = 0, fix: str = "none", overrides: Optional[dict] = None, max_steps: int = -1) -> RunConfig:
    """``reproduction_config(dataset, fix)`` with lr, clipping and seed set (:func:`cell_config`).

    Args:
        dataset: a dataset with a shipped reproduction ("ishigami", "dyconex").
        lr: AdamW learning rate per optimizer step (None: the shipped config's).
        gradient_clip_val: max total L2 gradient norm, applied by ``Trainer(gradient_clip_val=...)``
            (clip setting ``norm <value>``); None or 0 turns clipping off (setting ``none``).
        seed: ``training.seed`` (fold k re-seeds with ``seed + k``).
        fix: a fix overlay applied first (:data:`~prot_lib.training.config.FIXES`).
        overrides: further dotted overrides, e.g. ``{"model.n_layers": 2}``.
        max_steps: with ``max_steps > 0``, ``max_epochs`` is raised so a fold can reach it.

    Raises:
        ConfigError: unknown dataset or fix, or a bad override.
    """
    setting = f"norm {float(gradient_clip_val):g}" if gradient_clip_val else "none"
    return cell_config(reproduction_config(dataset, fix), lr, setting, seed, overrides, max_steps, extend_epochs=True)


def quick_train(dataset: str = "ishigami", lr: Optional[float] = None, gradient_clip_val: Optional[float] = None,
                max_steps: int = 120, seed: int = 0, fold: int = 0, fix: str = "none",
                overrides: Optional[dict] = None, run_dir=None) -> KFoldResult:
    """Train one fold of :func:`quick_config` for ``max_steps`` optimizer steps (-1: the config's
    ``max_epochs``); returns its :class:`KFoldResult`. Logs go to a temporary folder unless ``run_dir``
    is given; Lightning's banner is silenced."""
    cfg = quick_config(dataset, lr, gradient_clip_val, seed, fix, overrides, max_steps)
    with contextlib.ExitStack() as stack:
        if run_dir is None:
            run_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="prot_lib_quick_"))
        stack.enter_context(quiet_lightning())
        return run_kfold(cfg, folds=[fold], max_steps=max_steps, run_dir=Path(run_dir), progress=False,
                         keep_models=False)


class AdamStepRecorder(pl.Callback):
    """Per optimizer step: how far Adam moved the weights, and the size of its second moment.

    Rows (:attr:`rows`, one per optimizer step): ``step``, ``update_norm`` (L2 norm of the change of all
    parameters made by the step, ``||theta_{t+1} - theta_t||``), ``sqrt_v_norm`` (L2 norm of
    ``sqrt(exp_avg_sq)`` over all parameters: the gradient scale Adam divides by). The parameters are
    read in ``on_before_optimizer_step`` (Lightning calls it after backward, before clipping and the
    step) and again in ``on_train_batch_end``.
    """

    def __init__(self) -> None:
        self.rows: List[dict] = []
        self._before: Optional[torch.Tensor] = None
        self._optimizer = None

    @staticmethod
    def _flat(module) -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1).clone() for p in module.parameters()])

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self._before = self._flat(pl_module)
        self._optimizer = optimizer

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self._before is None:
            return
        after = self._flat(pl_module)
        sq = [s["exp_avg_sq"].sum() for s in self._optimizer.state.values() if "exp_avg_sq" in s]
        # sum(sqrt(v)^2) = sum(v): the norm of sqrt(v) without building it
        v_norm = float(torch.stack(sq).sum().sqrt()) if sq else math.nan
        self.rows.append({"step": trainer.global_step - 1, "update_norm": float((after - self._before).norm()),
                          "sqrt_v_norm": v_norm})
        self._before = None

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows, columns=["step", "update_norm", "sqrt_v_norm"])


def adam_probe(dataset: str = "ishigami", lr: Optional[float] = None, gradient_clip_val: Optional[float] = None,
               max_steps: int = 150, seed: int = 0, fold: int = 0,
               overrides: Optional[dict] = None) -> pd.DataFrame:
    """One :func:`quick_train` fold with an :class:`AdamStepRecorder`: its history joined with the
    recorder's ``update_norm`` and ``sqrt_v_norm`` per step (never cached: callbacks disable the cache).
    ``overrides``: dotted config overrides, as :func:`quick_config` (e.g. ``topology_overrides("layers")``)."""
    rec = AdamStepRecorder()
    cfg = quick_config(dataset, lr, gradient_clip_val, seed, overrides=overrides, max_steps=max_steps)
    with tempfile.TemporaryDirectory(prefix="prot_lib_probe_") as tmp, quiet_lightning():
        res = run_kfold(cfg, folds=[fold], max_steps=max_steps, run_dir=Path(tmp), progress=False,
                        callbacks=[rec], keep_models=False)
    return res.history.merge(rec.frame(), on="step", how="left")


def adam_toy_steps(grads: Sequence[float], lr: float = 1e-2, clip: Optional[float] = None,
                   betas=(0.9, 0.999), eps: float = 1e-8) -> np.ndarray:
    """|Delta theta| of ``torch.optim.AdamW`` (no weight decay) on one scalar parameter fed ``grads``.

    The gradient of step t is set to ``grads[t]`` (optionally clipped to ``|g| <= clip``, which for one
    parameter is what ``clip_grad_norm_`` does) and the optimizer steps; returns the size of each step.
    Shows Adam's scale invariance: every step is about ``lr`` whatever the gradient's size.
    """
    p = torch.zeros(1, requires_grad=True)
    opt = torch.optim.AdamW([p], lr=lr, betas=betas, eps=eps, weight_decay=0.0)
    steps = []
    for g in grads:
        before = float(p.detach())
        p.grad = torch.tensor([float(g)])
        if clip is not None:
            torch.nn.utils.clip_grad_norm_([p], clip)
        opt.step()
        steps.append(abs(float(p.detach()) - before))
    return np.asarray(steps)
