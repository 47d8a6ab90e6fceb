"""The container every dataset is loaded into, and the error every loader raises.

A dataset here is a batch of *sequences of tokens*, the form a process-chain model
(Mamba/S6 or a transformer) consumes:

    x: (N, L, F) float32   N sequences, L tokens each, F features per token
    y: (N,)      float32   one regression target per sequence

``x`` and ``y`` are kept exactly as the files hold them: raw units, raw Unix
timestamps, NaN where a value or a label is missing. That is on purpose: the book
first trains on these raw tensors to show how they produce a NaN loss, then calls
:meth:`SequenceData.normalized` (the honest fix) and trains again.

Roles of the features are declared in ``meta`` so that generic code (the
normaliser, the plots) can treat them correctly without knowing the dataset:

    meta["feature_roles"]      {feature name: "value" | "timestamp" | "onehot" | "indicator"}
    meta["token_groups"]       list of L labels; a "value" feature is standardised
                               separately for each label (e.g. per variable id)
    meta["nullable_features"]  features that may hold NaN (missing measurements)
    meta["row_ids"]            list of N ids (sample_id / chain_id), kept by subset()
    meta["synthetic"]          True when the numbers do not come from a real process
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable

import numpy as np
import torch

from .indexing import as_index
from .normalize import standardize

__all__ = ["DataError", "SequenceData", "as_index"]


class DataError(ValueError):
    """A data file is missing or does not match its schema.

    The message always names the file and, where they apply, the 1-based line
    number as an editor shows it (the header is line 1), the column and the
    chain/sample id, so the reader can open the file and see the culprit.
    """


@dataclass(eq=False)
class SequenceData:
    """Sequences of tokens plus one target per sequence.

    Attributes:
        name: dataset name, e.g. ``"ishigami"`` or ``"dyconex"``.
        x: (N, L, F) float32. Raw inputs; NaN marks a missing measurement.
        y: (N,) float32. Raw targets in the dataset's unit (``meta["target_unit"]``);
            NaN marks a missing label (the training loss must mask it).
        feature_names: F names, one per last axis of ``x``.
        meta: free-form facts about the data; see the module docstring for the keys
            the library reads.
        normalizer: optional ``f(data, train_idx) -> SequenceData`` that replaces the
            default :func:`prot_lib.data.normalize.standardize` in :meth:`normalized`.
            ``None`` (the default) means the generic, meta-driven standardisation.

    Raises ValueError (on construction): wrong dtype, rank or mismatched sizes.
    """

    name: str
    x: torch.Tensor
    y: torch.Tensor
    feature_names: list[str]
    meta: dict = field(default_factory=dict)
    normalizer: Callable[["SequenceData", Any], "SequenceData"] | None = field(
        default=None, repr=False
    )

    def __post_init__(self) -> None:
        if self.x.dtype != torch.float32 or self.x.dim() != 3:
            raise ValueError(f"{self.name}: x must be (N, L, F) float32, got {self.x.dtype} {tuple(self.x.shape)}")
        if self.y.dtype != torch.float32 or self.y.shape != (self.x.shape[0],):
            raise ValueError(
                f"{self.name}: y must be ({self.x.shape[0]},) float32, got {self.y.dtype} {tuple(self.y.shape)}"
            )
        if len(self.feature_names) != self.x.shape[2]:
            raise ValueError(
                f"{self.name}: {len(self.feature_names)} feature names for {self.x.shape[2]} features"
            )
        row_ids = self.meta.get("row_ids")
        if row_ids is not None and len(row_ids) != len(self):
            raise ValueError(f"{self.name}: meta['row_ids'] has {len(row_ids)} ids for {len(self)} rows")

    def __len__(self) -> int:
        return self.x.shape[0]

    @property
    def shape(self) -> tuple[int, int, int]:
        """(N, L, F)."""
        return tuple(self.x.shape)  # type: ignore[return-value]

    def subset(self, idx: Any) -> "SequenceData":
        """The rows ``idx`` (ints, bool mask, slice, array or tensor), as a new object.

        ``x``/``y`` are indexed copies; ``meta["row_ids"]`` follows the rows, the rest
        of ``meta`` is shared (shallow copy).
        """
        index = as_index(idx, len(self))
        meta = dict(self.meta)
        if "row_ids" in meta:
            meta["row_ids"] = [self.meta["row_ids"][i] for i in index.tolist()]
        return replace(self, x=self.x[index], y=self.y[index], meta=meta)

    def normalized(self, train_idx: Any) -> "SequenceData":
        """The honest fix for raw scales: all N rows transformed with statistics of the
        training rows ``train_idx`` only (so a fold's validation rows never leak in).

        By default (:func:`prot_lib.data.normalize.standardize`):

        * "value" features: standardised per ``meta["token_groups"]`` label (Dyconex:
          per variable id, so degC, Pa and s each get their own mean/std), with
          NaN-aware mean and std over the training rows;
        * "timestamp" features (raw Unix s): hours since the chain's first step, then
          standardised; renamed ``"<name>_h"``;
        * "onehot" and "indicator" features: unchanged;
        * every feature that may be missing gets a 0/1 feature ``"<name>_missing"``
          appended (1 where the raw value was NaN) and its NaN replaced by 0;
        * ``y`` unchanged: NaN labels stay NaN, the loss masks them.

        Returns a new SequenceData with no NaN in ``x``; the fitted statistics are in
        ``meta["normalization"]``. A dataset can override this with ``normalizer``.

        Raises ValueError: ``train_idx`` selects no row.
        """
        if self.normalizer is not None:
            return self.normalizer(self, train_idx)
        return standardize(self, train_idx)

    def describe(self) -> dict[str, Any]:
        """Facts a reader checks first: shape, NaN fractions, per-feature |max|."""
        finite_abs = torch.nan_to_num(self.x.abs(), nan=0.0)
        return {
            "name": self.name,
            "shape": self.shape,
            "x_nan_fraction": float(torch.isnan(self.x).float().mean()),
            "y_nan_fraction": float(torch.isnan(self.y).float().mean()),
            "abs_max_per_feature": dict(
                zip(self.feature_names, finite_abs.amax(dim=(0, 1)).tolist())
            ),
            "synthetic": bool(self.meta.get("synthetic", False)),
        }
