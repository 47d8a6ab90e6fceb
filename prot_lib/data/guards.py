"""Data guards: a non-finite value at the model's input is an error that names the sample and the feature.

One NaN in one input row is enough for a NaN loss: it goes through the embedding into every later token
of the scan, into the loss, into every gradient (the Dyconex stand-in does exactly this at step 0). A
report then reads "occasional NaN losses" (wongzbb/DiffMa-Diffusion-Mamba#18) when the cause is a data
row. The guard turns that into an error at the batch that holds the row, before any forward pass:

    DataError: non-finite input in sample 17 (row id 'C0017'), feature 'value' (index 10), token 3: nan
    (the feature is declared nullable in the dataset: mask it with data.normalize: true)

Where it is wired: :func:`check_finite_batch` is the one check, behind two doors.
:class:`prot_lib.callbacks.DataGuard` is a Lightning callback for any model; it checks each batch in
``on_train_batch_start`` / ``on_validation_batch_start`` and names the batch, the sample and the feature
(and the dataset row, when the batch carries each sample's row: ``training.data_guard: true`` makes
:func:`prot_lib.training.kfold.make_loaders` add it as a third tensor, so the message also gives the
row id). :class:`GuardedDataset` checks at fetch time, for a plain PyTorch loop without Lightning. The
batches' inputs and targets are the same either way, so a clean dataset trains bit for bit the same
with the guard on or off.

Missing values, done honestly (how the pieces relate):

* inputs: a value that is *missing* is not an error when it is masked. :meth:`SequenceData.normalized`
  (``data.normalize: true``) replaces each missing value by 0 and appends a 0/1 ``<name>_missing``
  feature. Followed by the model's linear embedding this *is* a mask-aware embedding:
  ``W [x * m ; 1 - m] = W_x (x * m) + W_m (1 - m)``: a missing feature contributes a learned "missing"
  vector instead of a value. The guard therefore checks the tensors the model sees: after
  normalisation nothing is missing, and with ``data.normalize: false`` a missing value reaches the
  model and the guard raises (its message says the feature was declared nullable). ``nullable_features``
  of :func:`check_finite_batch` exempts features for callers that mask them themselves.
  (:class:`~prot_lib.models.S6Regressor`'s ``mask`` argument is a different mask: whole *tokens*, e.g.
  padding, not single features.)
* targets: a missing label is masked out of the loss by ``training.mask_missing_targets: true``
  (the guard then accepts NaN targets, never inf). ``torch.nan_to_num(y)`` instead invents a label of 0
  for every missing one and biases the fit toward 0: :func:`prot_lib.diagnostics.missing.compare_target_handling`
  measures by how much.
"""
from __future__ import annotations

import math
from typing import Any, Iterable, List, Optional, Sequence

import torch
from torch.utils.data import Dataset

from .base import DataError, SequenceData, as_index

__all__ = ["DataError", "GuardedDataset", "check_finite_batch"]


def _row_label(sample: int, row_ids: Optional[Sequence[Any]], of_batch: bool = False) -> str:
    label = f"sample {sample}" + (" of the batch" if of_batch else "")
    if row_ids is None:
        return label
    return f"{label} (row id {row_ids[sample]!r})"


def _feature_label(f: int, feature_names: Optional[Sequence[str]]) -> str:
    return f"feature {f}" if feature_names is None else f"feature {feature_names[f]!r} (index {f})"


def check_finite_batch(x: torch.Tensor, y: Optional[torch.Tensor], feature_names: Optional[Sequence[str]] = None,
                       nullable_features: Iterable[str] = (), sample_index: Optional[Sequence[int]] = None,
                       row_ids: Optional[Sequence[Any]] = None, allow_missing_targets: bool = False,
                       declared_nullable: Iterable[str] = (), batch_label: Optional[str] = None) -> None:
    """Raise :class:`DataError` at the first non-finite value of a batch, naming sample and feature.

    The one check behind both guards: :class:`GuardedDataset` (a dataset that knows its rows) and
    :class:`prot_lib.callbacks.DataGuard` (a Lightning callback for any model). One fused
    ``torch.isfinite(...).any()`` per tensor when the batch is clean.

    Args:
        x: (batch, L, F) token sequences, (batch, F) rows, or (batch,) / (batch, d1, ..., F) inputs.
            NaN is allowed only in ``nullable_features``; inf never.
        y: (batch,) or (batch, k) targets, or None. NaN is allowed only with ``allow_missing_targets``;
            inf never.
        feature_names: the F names of the last axis of ``x`` (None: features are named by index).
        nullable_features: features whose NaN the caller masks (exempt from the NaN check).
        sample_index: (batch,) row of each batch item in the full dataset (default: the position in
            the batch, said as "of the batch" when ``batch_label`` is given).
        row_ids: the full dataset's ``meta["row_ids"]``; the message adds the id of the row.
        allow_missing_targets: NaN targets are masked by the loss (``training.mask_missing_targets``).
        declared_nullable: features the dataset declares as possibly missing; only used to add a hint
            to the message (they are *not* exempt: see the module docstring).
        batch_label: where the batch is, e.g. ``"batch 7 (epoch 0)"``; put first in the message.

    Raises:
        DataError: e.g. "non-finite input in sample 17 (row id 'C0017'), feature 'value' (index 10),
            token 3: nan"; inputs are checked before targets, the lowest sample first.
        ValueError: ``feature_names`` does not match the last axis of ``x``.
    """
    if feature_names is not None and (x.dim() < 2 or x.shape[-1] != len(feature_names)):
        raise ValueError(f"x must be (batch, ..., {len(feature_names)}), got {tuple(x.shape)}")
    where = f"{batch_label}, " if batch_label else ""
    of_batch = sample_index is None and batch_label is not None
    index = list(range(x.shape[0])) if sample_index is None else [int(i) for i in sample_index]
    nullable = set(nullable_features)
    bad = ~torch.isfinite(x)
    if nullable and feature_names is not None:
        exempt = torch.tensor([n in nullable for n in feature_names], device=x.device)
        bad &= ~(torch.isnan(x) & exempt)
    if bool(bad.any()):
        pos = [int(v) for v in bad.nonzero()[0]]
        b = pos[0]
        parts = [_row_label(index[b], row_ids, of_batch)]
        if x.dim() >= 2:
            f = pos[-1]
            parts.append(_feature_label(f, feature_names))
            middle = pos[1:-1]
            if len(middle) == 1:
                parts.append(f"token {middle[0]}")
            elif middle:
                parts.append(f"position {tuple(middle)}")
            hint = ""
            if feature_names is not None and feature_names[f] in set(declared_nullable):
                hint = " (the feature is declared nullable in the dataset: mask it with data.normalize: true)"
        else:
            hint = ""
        raise DataError(f"non-finite input in {where}{', '.join(parts)}: {float(x[tuple(pos)])}{hint}")
    if y is None:
        return
    bad_y = ~torch.isfinite(y)
    if allow_missing_targets:
        bad_y &= ~torch.isnan(y)
    if bool(bad_y.any()):
        pos = [int(v) for v in bad_y.nonzero()[0]]
        b = pos[0]
        value = float(y[tuple(pos)])
        column = f", column {pos[1]}" if y.dim() == 2 else (f", position {tuple(pos[1:])}" if y.dim() > 2 else "")
        hint = "" if allow_missing_targets or not math.isnan(value) else \
            " (a missing label: mask it with training.mask_missing_targets: true)"
        raise DataError(f"non-finite target in {where}{_row_label(index[b], row_ids, of_batch)}{column}: {value}{hint}")


class GuardedDataset(Dataset):
    """Rows ``rows`` of a :class:`SequenceData` as ``(x, y)`` items, each batch checked by
    :func:`check_finite_batch` when the DataLoader fetches it.

    Items are the same tensors a ``TensorDataset(data.x[rows], data.y[rows])`` yields, in the same order;
    the DataLoader's batched fetch (``__getitems__``) checks a whole batch with one reduction.

    Args:
        data: the dataset the model sees (raw, or normalised for the fold).
        rows: which rows (ints, bool mask, slice, array or tensor).
        allow_missing_targets: accept NaN targets (the loss masks them).
        nullable_features: features exempt from the NaN check (the caller masks them); default none.

    Raises (on fetch):
        DataError: a non-finite input or target; names the row in ``data``, its row id and the feature.
    """

    def __init__(self, data: SequenceData, rows: Any, allow_missing_targets: bool = False,
                 nullable_features: Iterable[str] = ()) -> None:
        self.rows = as_index(rows, len(data))
        self.x = data.x[self.rows]
        self.y = data.y[self.rows]
        self.feature_names = list(data.feature_names)
        self.row_ids = data.meta.get("row_ids")
        self.declared_nullable = list(data.meta.get("nullable_features", []))
        self.nullable_features = list(nullable_features)
        self.allow_missing_targets = allow_missing_targets
        self._rows_list: List[int] = self.rows.tolist()

    def __len__(self) -> int:
        return len(self._rows_list)

    def _check(self, items: Sequence[int]) -> None:
        idx = torch.as_tensor(items, dtype=torch.long)
        check_finite_batch(self.x[idx], self.y[idx], self.feature_names, self.nullable_features,
                           sample_index=[self._rows_list[i] for i in items], row_ids=self.row_ids,
                           allow_missing_targets=self.allow_missing_targets,
                           declared_nullable=self.declared_nullable)

    def __getitem__(self, i: int):
        self._check([int(i)])
        return self.x[i], self.y[i]

    def __getitems__(self, items: Sequence[int]):
        items = [int(i) for i in items]
        self._check(items)
        return [(self.x[i], self.y[i]) for i in items]
