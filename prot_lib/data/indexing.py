"""Row selection shared by the dataset container, the normaliser and the guards."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

__all__ = ["as_index"]


def as_index(idx: Any, n: int) -> torch.Tensor:
    """Turn ``idx`` (ints, a bool mask of length n, a slice, an array or tensor) into a
    1-D int64 tensor of row numbers in ``[0, n)``.

    Raises IndexError: a row number outside ``[-n, n)``, or a mask of the wrong length.
    """
    if isinstance(idx, slice):
        return torch.arange(n)[idx]
    if isinstance(idx, (int, np.integer)):
        idx = [int(idx)]
    index = torch.as_tensor(np.asarray(idx))
    if index.dtype == torch.bool:
        if index.shape != (n,):
            raise IndexError(f"boolean mask has shape {tuple(index.shape)}, expected ({n},)")
        return index.nonzero().flatten()
    index = index.reshape(-1).long()
    if index.numel() and (index.min() < -n or index.max() >= n):
        raise IndexError(f"row index out of range for {n} rows")
    return index % n if n else index
