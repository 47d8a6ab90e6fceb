"""Rebuild and trace the failing step of a :class:`prot_lib.diagnostics.NonfiniteSnapshot` of a
:class:`NaNStudyModule` run (the book's chapters 1, 2 and 8).

:class:`~prot_lib.diagnostics.NonfiniteSnapshot` keeps ``state_dict`` and ``batch`` of the first bad
step of any LightningModule; these helpers turn such a snapshot of *this* project's module back into
the module (:func:`snapshot_module`) and trace its raw loss (:func:`trace_snapshot`, module names
relative to the S6Regressor: ``embedding``, ``bimamba.layers.0...``, ``head``).
"""
from __future__ import annotations

from typing import Any, Callable, Dict

import torch

from ..diagnostics.trace import TraceReport, trace_nonfinite
from .config import RunConfig
from .module import NaNStudyModule


def snapshot_module(snapshot: Dict[str, Any], config: RunConfig) -> NaNStudyModule:
    """The :class:`NaNStudyModule` of ``config`` with the snapshot's weights (``strict=True``).

    ``n_features`` is read from the snapshot's batch ``x: (batch, L, F)``. Building the module draws
    initial weights from the global RNG (as constructing any module does).

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
    """The raw training loss exactly as :meth:`NaNStudyModule.raw_loss` computes it (before any
    sanitisation): ``mean(loss_elements(pred[valid], y[valid]))``, ``valid`` = target not NaN when
    ``training.mask_missing_targets`` is on, else every element. pred, y: (batch,) -> scalar."""
    mask = module.config.training.mask_missing_targets

    def loss_fn(pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        valid = module._valid(y)
        return module.loss_elements(pred[valid], y[valid]).mean()

    loss_fn.__name__ = f"{module.config.training.loss_fn}{' (NaN targets masked)' if mask else ''}"
    return loss_fn


def trace_snapshot(snapshot: Dict[str, Any], config: RunConfig) -> TraceReport:
    """Trace the failing step of a :class:`~prot_lib.diagnostics.NonfiniteSnapshot`: the model with the
    weights it had before that step, on that step's batch ``(x, y)``, with the config's raw loss.

    Module names in the report are relative to the S6Regressor (``embedding``, ``bimamba.layers.0...``,
    ``head``). Raises as :func:`snapshot_module`.
    """
    module = snapshot_module(snapshot, config)
    module.train()
    x, y = snapshot["batch"][0], snapshot["batch"][1]
    return trace_nonfinite(module.model, x, y, module_loss_fn(module))
