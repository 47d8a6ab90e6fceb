"""Atomic file writes: a reader (or a crash) sees the old file or the new one, never a partial one.

The one helper behind every file prot_lib writes that someone may read back: repro bundles
(:mod:`prot_lib.diagnostics.autopsy`), checkpoints (:class:`prot_lib.callbacks.FiniteCheckpoint`).
Write to a temporary file in the target's folder (same filesystem, so the rename is atomic), flush
and ``fsync`` it, then ``os.replace`` it over the target (POSIX ``rename(2)``; atomic on Windows too
for a file on the same volume). Nothing else in prot_lib is imported here (lowest layer).
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator, Union

import torch

PathLike = Union[str, "os.PathLike[str]"]


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on a clean exit fsync it and move it onto ``path``.

    The caller writes the temporary file (any writer: ``torch.save``, Lightning's
    ``trainer.save_checkpoint``). On an exception the temporary file is removed and ``path`` is left
    as it was.

    Raises:
        FileNotFoundError: the writer did not create the temporary file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as f:  # data on disk before the rename makes it visible
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def atomic_save(obj: Any, path: PathLike) -> Path:
    """``torch.save(obj, path)`` through :func:`atomic_path`; returns ``path`` as a ``Path``."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)
