"""Fast single-fold trainings for the clip-value widget and small sweeps.

One fold, a few hundred optimizer steps at most, on one CPU thread: a few seconds each. The run is the
shipped reproduction (:func:`~prot_lib.training.config.reproduction_config`) with three knobs turned
(learning rate, ``gradient_clip_val`` applied by ``Trainer(gradient_clip_val=...)``, seed), trained by
the same :func:`~prot_lib.training.kfold.run_kfold` as every chapter, so the numbers are the chapters'
numbers (and cached with them under ``PROT_LIB_CACHE``).
"""
from __future__ import annotations

import contextlib
import logging
import math
import tempfile
from pathlib import Path
from typing import Iterable, List, Optional, Sequence

import lightning.pytorch as pl
import numpy as np
import pandas as pd
import torch

from .config import RunConfig, reproduction_config
from .kfold import KFoldResult, run_kfold

#: Lightning's loggers that print "GPU available: ..." and tips at every Trainer construction
_CHATTY_LOGGERS = ("lightning.pytorch", "lightning.fabric", "lightning")


@contextlib.contextmanager
def quiet_lightning(level: int = logging.WARNING):
    """Raise Lightning's loggers to ``level`` for the duration (a widget redraw should print nothing)."""
    loggers = [logging.getLogger(n) for n in _CHATTY_LOGGERS]
    old = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(level)
    try:
        yield
    finally:
        for lg, lv in zip(loggers, old):
            lg.setLevel(lv)


def quick_config(dataset: str = "ishigami", lr: Optional[float] = None, gradient_clip_val: Optional[float] = None,
                 seed: int = 0, fix: str = "none", overrides: Optional[dict] = None) -> RunConfig:
    """``reproduction_config(dataset, fix)`` with lr, clipping and seed set.

    Args:
        dataset: "ishigami" or "dyconex".
        lr: AdamW learning rate per optimizer step (None: the shipped config's).
        gradient_clip_val: max total L2 gradient norm, applied by ``Trainer(gradient_clip_val=...)``
            (``clip_via: trainer``); None or 0 turns clipping off.
        seed: ``training.seed`` (fold k re-seeds with ``seed + k``).
        fix: a fix overlay applied first (see :data:`~prot_lib.training.config.FIXES`).
        overrides: further dotted overrides, e.g. ``{"model.n_layers": 2}``.
    """
    cfg = reproduction_config(dataset, fix)
    upd = {"training.gradient_clip_val": gradient_clip_val if gradient_clip_val else None,
           "training.clip_via": "trainer", "training.seed": int(seed)}
    if lr is not None:
        upd["training.lr"] = float(lr)
    upd.update(overrides or {})
    return cfg.updated(upd)


def quick_train(dataset: str = "ishigami", lr: Optional[float] = None, gradient_clip_val: Optional[float] = None,
                max_steps: int = 120, seed: int = 0, fold: int = 0, fix: str = "none",
                overrides: Optional[dict] = None, run_dir=None) -> KFoldResult:
    """Train one fold of the reproduction for ``max_steps`` optimizer steps; returns its :class:`KFoldResult`.

    ``max_steps`` is capped by the config's ``max_epochs`` (Ishigami: 25 steps per epoch, Dyconex: 15),
    which is raised when needed; -1 trains the config's ``max_epochs``. Logs go to a temporary folder
    unless ``run_dir`` is given; Lightning's banner is silenced.
    """
    return _quick_run(dataset, lr, gradient_clip_val, max_steps, seed, [fold], fix, overrides, run_dir)


def _quick_run(dataset, lr, gradient_clip_val, max_steps, seed, folds, fix="none", overrides=None,
               run_dir=None) -> KFoldResult:
    cfg = quick_config(dataset, lr, gradient_clip_val, seed, fix, overrides)
    need_epochs = math.ceil(max_steps / 15) + 1 if max_steps > 0 else cfg.training.max_epochs
    if need_epochs > cfg.training.max_epochs:
        cfg = cfg.updated({"training.max_epochs": need_epochs})
    with contextlib.ExitStack() as stack:
        if run_dir is None:
            run_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="prot_lib_quick_"))
        stack.enter_context(quiet_lightning())
        return run_kfold(cfg, folds=list(folds), max_steps=max_steps, run_dir=Path(run_dir), progress=False,
                         keep_models=False)


def run_outcome(history: pd.DataFrame) -> dict:
    """What one fold's history says, in numbers.

    Returns a dict: ``nonfinite`` (any non-finite loss, gradient norm or parameter), ``first_nan_step``
    (first step whose raw loss, pre-clip gradient norm or parameters are non-finite; None if none),
    ``final_loss`` (mean raw loss of the last 10 steps; NaN when the run died), ``max_loss`` (largest
    finite raw loss), ``max_grad_norm`` (largest finite pre-clip norm), ``n_steps``.
    """
    h = history.sort_values("step")
    bad = ~(h["loss_finite"] & h["grad_finite"] & h["params_finite"])
    first = int(h.loc[bad, "step"].iloc[0]) if bad.any() else None
    loss = h["raw_loss"].to_numpy(dtype=float)
    gn = h["grad_norm_before_clip"].to_numpy(dtype=float)
    fin_loss, fin_gn = loss[np.isfinite(loss)], gn[np.isfinite(gn)]
    return {
        "nonfinite": bool(bad.any()),
        "first_nan_step": first,
        "final_loss": float(np.mean(loss[-10:])) if len(loss) else math.nan,
        "max_loss": float(fin_loss.max()) if len(fin_loss) else math.nan,
        "max_grad_norm": float(fin_gn.max()) if len(fin_gn) else math.nan,
        "n_steps": int(len(h)),
    }


def clip_sweep(dataset: str = "ishigami", lr: Optional[float] = None,
               clip_values: Sequence[Optional[float]] = (None, 0.1, 1.0, 10.0),
               max_steps: int = 150, seeds: Iterable[int] = (0,), folds: Iterable[int] = (0,),
               fix: str = "none", overrides: Optional[dict] = None) -> pd.DataFrame:
    """Train one short fold per (clip value, seed, fold) and tabulate what happened.

    Args:
        clip_values: ``gradient_clip_val`` values; None (or 0) means clipping off.
        lr, max_steps, fix, overrides: as :func:`quick_train`.

    Returns:
        one row per run: ``clip`` (label: "off" or the value), ``gradient_clip_val`` (float, inf when
        off, for sorting and log axes), ``seed``, ``fold``, ``lr``, the :func:`run_outcome` columns, and
        ``frac_clipped`` (fraction of finite steps whose pre-clip norm exceeded the clip value).
    """
    rows = []
    folds = [int(f) for f in folds]
    for clip in clip_values:
        for seed in seeds:
            # one run_kfold per (clip, seed): with clipping off, seed 0, all folds and max_steps=-1 this is
            # exactly the shipped reproduction, read back from PROT_LIB_CACHE when a chapter ran it
            res = _quick_run(dataset, lr, clip, max_steps, seed, folds, fix, overrides)
            for fold, h in res.history.groupby("fold"):
                out = run_outcome(h)
                gn = h["grad_norm_before_clip"].to_numpy(dtype=float)
                fin = np.isfinite(gn)
                frac = float((gn[fin] > clip).mean()) if (clip and fin.any()) else 0.0
                rows.append({"clip": "off" if not clip else f"{clip:g}",
                             "gradient_clip_val": float(clip) if clip else math.inf, "seed": int(seed),
                             "fold": int(fold), "lr": float(res.config.training.lr), **out,
                             "frac_clipped": frac})
    return pd.DataFrame(rows)


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
               max_steps: int = 150, seed: int = 0, fold: int = 0) -> pd.DataFrame:
    """One :func:`quick_train` fold with an :class:`AdamStepRecorder`: its history joined with the
    recorder's ``update_norm`` and ``sqrt_v_norm`` per step (never cached: callbacks disable the cache)."""
    rec = AdamStepRecorder()
    cfg = quick_config(dataset, lr, gradient_clip_val, seed)
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
