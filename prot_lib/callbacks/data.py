"""The first non-finite input or target is an error naming the batch, the sample and the feature: :class:`DataGuard`.

One NaN in one input row is enough for a NaN loss: it goes through the embedding into every later
token, into the loss, into every gradient. A report then reads "occasional NaN losses"
(wongzbb/DiffMa-Diffusion-Mamba#18) when the cause is a data row. The guard turns that into an error
at the batch that holds the row, before any forward pass. The check and its message are
:func:`prot_lib.data.guards.check_finite_batch` (one fused ``isfinite`` reduction per tensor on a clean
batch); this callback finds the inputs and targets in whatever batch the DataLoader yields.
"""
from __future__ import annotations

from typing import Any, Iterable, Optional, Sequence, Union

import torch

from ..compat import Callback
from ..data.guards import check_finite_batch

Key = Union[int, str]


def _pick(batch: Any, key: Optional[Key]) -> Optional[torch.Tensor]:
    if key is None:
        return None
    if isinstance(batch, dict):
        return batch.get(key)
    if isinstance(batch, (tuple, list)):
        return batch[key] if isinstance(key, int) and -len(batch) <= key < len(batch) else None
    return batch if key == 0 else None


class DataGuard(Callback):
    """Raise :class:`prot_lib.data.DataError` at the first non-finite value of a training (and
    validation) batch, naming the batch, the sample and the feature.

    Args:
        feature_names: names of the inputs' last axis (None: named by index).
        input_key, target_key: where the inputs and targets are in the batch: positions of a tuple/list
            batch (default ``(x, y)``: 0 and 1) or keys of a dict batch; ``target_key=None``: no target.
        sample_index: position or key of a (batch,) integer tensor holding each sample's row in the
            dataset; the message then names that row (and its id, with ``row_ids``), not only its
            position in the batch.
        row_ids: the dataset's row identifiers, indexed by row.
        allow_nan_targets: NaN targets are masked by the loss (still no inf).
        nullable_features: features whose NaN the model masks (exempt from the NaN check).
        declared_nullable: features the dataset declares as possibly missing (adds a hint).
        check_validation: check validation batches too.

    Raises (from ``trainer.fit``):
        prot_lib.data.DataError: e.g. "non-finite input in batch 3 (epoch 0), sample 500 (row id
            'R0500'), feature 'x3' (index 2), token 1: nan".

    Works with any LightningModule and DataLoader, under ``lightning.pytorch`` and ``pytorch_lightning``.

    Example::

        trainer = Trainer(callbacks=[DataGuard(feature_names=["pressure", "time"])])
    """

    def __init__(self, feature_names: Optional[Sequence[str]] = None, input_key: Key = 0,
                 target_key: Optional[Key] = 1, sample_index: Optional[Key] = None,
                 row_ids: Optional[Sequence[Any]] = None, allow_nan_targets: bool = False,
                 nullable_features: Iterable[str] = (), declared_nullable: Iterable[str] = (),
                 check_validation: bool = True) -> None:
        self.feature_names = None if feature_names is None else list(feature_names)
        self.input_key, self.target_key, self.sample_index = input_key, target_key, sample_index
        self.row_ids = row_ids
        self.allow_nan_targets = allow_nan_targets
        self.nullable_features, self.declared_nullable = list(nullable_features), list(declared_nullable)
        self.check_validation = check_validation

    def check(self, batch: Any, label: str) -> None:
        """Check one batch; ``label`` (e.g. ``"batch 3 (epoch 0)"``) starts the error message."""
        x = _pick(batch, self.input_key)
        if x is None or not torch.is_tensor(x):
            raise TypeError(f"DataGuard: no input tensor at {self.input_key!r} of the batch ({type(batch).__name__})")
        y = _pick(batch, self.target_key)
        rows = _pick(batch, self.sample_index)
        check_finite_batch(x, y if torch.is_tensor(y) else None, self.feature_names, self.nullable_features,
                           sample_index=None if rows is None else rows.tolist(), row_ids=self.row_ids,
                           allow_missing_targets=self.allow_nan_targets, declared_nullable=self.declared_nullable,
                           batch_label=label)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.check(batch, f"batch {batch_idx} (epoch {trainer.current_epoch})")

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx: int = 0) -> None:
        if self.check_validation:
            self.check(batch, f"validation batch {batch_idx} (epoch {trainer.current_epoch})")
