"""Tensor helpers shared by the training callbacks and the diagnostics."""
from __future__ import annotations

from typing import Any

import torch

__all__ = ["clone_batch"]


def clone_batch(obj: Any) -> Any:
    """Detached copies of every tensor in a (nested) batch; other objects are returned as they are.

    A batch is a tensor, or a tuple/list/dict of them, nested to any depth, e.g. ``(x, y)`` with
    x (batch, L, F) float32 and y (batch,) float32. The copies share no storage and no autograd graph
    with the originals, so a snapshot kept for later (a repro bundle, a rollback) is not changed by
    the optimizer or by the next batch. Tuples and lists keep their type (named tuples included).
    """
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # a named tuple takes positional args
        return type(obj)(*(clone_batch(o) for o in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(clone_batch(o) for o in obj)
    if isinstance(obj, dict):
        return {k: clone_batch(v) for k, v in obj.items()}
    return obj
