"""Separate the causes of one NaN: the same model and batch, one input trait switched on at a time.

Chapter 2 asks which trait of the Dyconex stand-in makes its loss NaN at step 0. Its raw batch has three
(raw scales, missing inputs, missing targets); :func:`dyconex_variant` builds the batch with any subset
of them, and :func:`trace_causes` traces one forward/backward pass per variant
(:func:`prot_lib.diagnostics.trace.trace_nonfinite`) and tabulates where the first non-finite value
appeared. Same initial weights for every variant, so the only difference is the input.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Sequence, Tuple

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from ..data import SequenceData
from .trace import trace_nonfinite

__all__ = ["NOTHING", "DYCONEX_CAUSES", "masked_mse", "dyconex_variant", "trace_causes"]

#: the table's entry where nothing is non-finite, or the value was not born in the model
NOTHING = "-"


def masked_mse(pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """MSE over the finite targets only: ``mse_loss(pred[~isnan(y)], y[~isnan(y)])``; pred, y: (batch,)."""
    valid = ~torch.isnan(y)
    return F.mse_loss(pred[valid], y[valid])


#: cause -> (values "raw"|"std", timestamps "raw"|"std", missing inputs as "nan"|"zero", loss)
DYCONEX_CAUSES: Dict[str, Tuple[str, str, str, Callable]] = {
    "as shipped (all three)": ("raw", "raw", "nan", F.mse_loss),
    "raw scales only": ("raw", "raw", "zero", masked_mse),
    "raw timestamps only": ("std", "raw", "zero", masked_mse),
    "raw values only (Pa, s, degC)": ("raw", "std", "zero", masked_mse),
    "missing inputs only (NaN)": ("std", "std", "nan", masked_mse),
    "missing targets only (NaN)": ("std", "std", "zero", F.mse_loss),
    "none (normalised + masked)": ("std", "std", "zero", masked_mse),
}


def dyconex_variant(raw: SequenceData, norm: SequenceData, rows: Sequence[int], values: str, timestamps: str,
                    missing_as: str) -> torch.Tensor:
    """The Dyconex inputs of ``rows`` with chosen traits: (len(rows), L, F) float32.

    Starts from ``norm`` (the standardised data, :meth:`SequenceData.normalized`: value feature 0,
    timestamp feature 1, missing values imputed with an indicator), puts back the raw values and/or raw
    timestamps of ``raw``, and writes the missing values as NaN (as the raw data has them) or 0.

    Raises:
        ValueError: an unknown choice (names it).
    """
    for name, v, ok in (("values", values, ("raw", "std")), ("timestamps", timestamps, ("raw", "std")),
                        ("missing_as", missing_as, ("nan", "zero"))):
        if v not in ok:
            raise ValueError(f"{name} must be one of {ok}, got {v!r}")
    rows = list(rows)
    missing = torch.isnan(raw.x[rows, :, 0])
    x = norm.x[rows].clone()
    if values == "raw":
        x[..., 0] = raw.x[rows, :, 0]
    if timestamps == "raw":
        x[..., 1] = raw.x[rows, :, 1]
    x[..., 0] = torch.where(missing, torch.tensor(math.nan if missing_as == "nan" else 0.0), x[..., 0])
    return x


def trace_causes(model: nn.Module, inputs: Dict[str, torch.Tensor], y: torch.Tensor,
                 losses: Dict[str, Callable], first_block: str) -> pd.DataFrame:
    """One traced forward/backward pass per variant; a table of where each went non-finite.

    Args:
        model: the regressor (its weights are not changed).
        inputs: {cause: x (batch, L, F)}.
        y: (batch,) targets (may hold NaN).
        losses: {cause: loss_fn(pred, y)}.
        first_block: module name whose output scale to report (e.g. ``bimamba.forward_layers.0``).

    Returns:
        DataFrame indexed by cause: "first non-finite (forward)" (module, or "loss"), "born at" (the
        module whose inputs were finite and output was not), "loss", "first non-finite gradient",
        "max |embedding|", "max |layer 0 out|", "max |prediction|"; :data:`NOTHING` where none.
    """
    table = []
    for cause, x in inputs.items():
        r = trace_nonfinite(model, x, y, losses[cause])
        scales = r.module_scales().set_index("name")
        table.append({"cause": cause, "first non-finite (forward)": r.first_forward or NOTHING,
                      "born at": r.born_forward or NOTHING, "loss": r.loss,
                      "first non-finite gradient": r.first_backward or NOTHING,
                      "max |embedding|": scales.loc["embedding", "max_abs_out"],
                      "max |layer 0 out|": scales.loc[first_block, "max_abs_out"],
                      "max |prediction|": r.prediction_max_abs})
    return pd.DataFrame(table).set_index("cause")
